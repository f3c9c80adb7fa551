#include <stdio.h>
#include "headrace.h"

/* Insert pending slot i into its group's parked list, keeping rank order.
 * The place is searched from both ends at once, so a task that ranks last
 * (FIFO) or near the front (a higher priority) is placed in a few steps. */
void hr_park(hr_ctx *c, uint32_t i)
{
    hr_slot *s = &c->s[i];
    hr_group *g = &c->g[s->group];
    uint64_t key = hr_rkey(s);
    uint32_t after, t = g->tail, h = g->head;
    for (;;) {
        if (t == HR_NONE || hr_rkey(&c->s[t]) <= key) { /* everything after t ranks below */
            after = t;
            break;
        }
        if (hr_rkey(&c->s[h]) > key) { /* everything before h ranks above */
            after = c->gl[h].prev;
            break;
        }
        t = c->gl[t].prev;
        h = c->gl[h].next;
    }
    uint32_t before = after == HR_NONE ? g->head : c->gl[after].next;
    c->gl[i] = (hr_glink){before, after};
    if (after == HR_NONE)
        g->head = i;
    else
        c->gl[after].next = i;
    if (before == HR_NONE)
        g->tail = i;
    else
        c->gl[before].prev = i;
    g->parked++;
    s->flags |= HR_F_PARKED;
    c->pos[i] = HR_NONE;
}

/* Take slot i out of its group's parked list (it stays pending). */
void hr_unpark(hr_ctx *c, uint32_t i)
{
    hr_slot *s = &c->s[i];
    hr_group *g = &c->g[s->group];
    hr_glink l = c->gl[i];
    if (l.prev == HR_NONE)
        g->head = l.next;
    else
        c->gl[l.prev].next = l.next;
    if (l.next == HR_NONE)
        g->tail = l.prev;
    else
        c->gl[l.next].prev = l.prev;
    g->parked--;
    s->flags &= (uint8_t)~HR_F_PARKED;
}

/* A running task of group g ended, or its limit rose: its best parked
 * tasks may run again, as many as it has room for. */
uint32_t hr_group_freed(hr_ctx *c, uint32_t gi)
{
    if (gi == 0)
        return 0;
    hr_group *g = &c->g[gi];
    uint32_t room = g->limit ? (g->running < g->limit ? g->limit - g->running : 0) : g->parked;
    uint32_t n = 0;
    while (room-- > 0 && g->head != HR_NONE) {
        uint32_t i = g->head;
        hr_unpark(c, i);
        hr_mm_push(&c->ready, hr_rkey(&c->s[i]), i);
        n++;
    }
    return n;
}

/* Before a rebuild: no members or running counts, nothing parked (limits stay). */
void hr_groups_reset(hr_ctx *c)
{
    for (uint32_t k = 0; k < HR_MAX_GROUPS; k++) {
        hr_group *g = &c->g[k];
        g->running = g->parked = g->members = 0;
        g->head = g->tail = HR_NONE;
    }
}

#define GFAIL(...) do { snprintf(msg, msglen, __VA_ARGS__); return HR_E_CORRUPT; } while (0)

/* Every group's running count and parked list agree with the slots. */
int hr_groups_check(hr_ctx *c, char *msg, uint32_t msglen)
{
    uint32_t cap = c->h->capacity;
    uint32_t parked_total = 0;
    for (uint32_t k = 1; k < HR_MAX_GROUPS; k++) {
        hr_group *g = &c->g[k];
        uint32_t n = 0, prev = HR_NONE;
        uint64_t last = 0;
        for (uint32_t i = g->head; i != HR_NONE; i = c->gl[i].next) {
            if (i >= cap || ++n > cap)
                GFAIL("parked list of group %u broken at slot %u", k, i);
            hr_slot *s = &c->s[i];
            if (s->state != HR_PENDING || s->group != k || !(s->flags & HR_F_PARKED))
                GFAIL("slot %u in the parked list of group %u is not a parked task of it", i, k);
            if (c->gl[i].prev != prev || (n > 1 && hr_rkey(s) < last))
                GFAIL("parked list of group %u out of order at slot %u", k, i);
            last = hr_rkey(s);
            prev = i;
        }
        if (n != g->parked || prev != g->tail)
            GFAIL("group %u counts %u parked, its list holds %u", k, g->parked, n);
        parked_total += n;
    }
    uint32_t running[HR_MAX_GROUPS] = {0}, members[HR_MAX_GROUPS] = {0};
    uint32_t flagged = 0;
    for (uint32_t i = 0; i < cap; i++) {
        hr_slot *s = &c->s[i];
        if (s->state != HR_FREE && s->group >= HR_MAX_GROUPS)
            GFAIL("slot %u has group %u", i, s->group);
        if (s->state == HR_RUNNING && s->group)
            running[s->group]++;
        if (s->state != HR_FREE)
            members[s->group]++;
        if (s->flags & HR_F_PARKED)
            flagged++;
    }
    if (flagged != parked_total)
        GFAIL("%u slots are flagged parked, the lists hold %u", flagged, parked_total);
    for (uint32_t k = 1; k < HR_MAX_GROUPS; k++) {
        if (running[k] != c->g[k].running)
            GFAIL("group %u runs %u tasks, it counts %u", k, running[k], c->g[k].running);
        if (members[k] != c->g[k].members)
            GFAIL("group %u holds %u slots, it counts %u", k, members[k], c->g[k].members);
    }
    return HR_OK;
}
