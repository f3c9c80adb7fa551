#include "headrace.h"

uint32_t hr_slot_alloc(hr_ctx *c)
{
    uint32_t i = c->h->free_head;
    if (i == HR_NONE)
        return HR_NONE;
    c->h->free_head = c->pos[i];
    c->h->nfree--;
    c->pos[i] = HR_NONE;
    return i;
}

/* Return slot i (already out of every heap and set) to the free list. */
void hr_slot_release(hr_ctx *c, uint32_t i)
{
    hr_slot *s = &c->s[i];
    hr_slot_begin(c, i);
    c->h->count[s->state]--;
    c->h->count[HR_FREE]++;
    if (s->group)
        c->g[s->group].members--;
    memset(s, 0, sizeof *s);
    c->pos[i] = c->h->free_head;
    hr_slot_end(c);
    c->h->free_head = i;
    c->h->nfree++;
}

/* Put slot i into the heap its state calls for (a pending task of a full
 * group into its group's parked list instead). */
void hr_heap_link(hr_ctx *c, uint32_t i)
{
    hr_slot *s = &c->s[i];
    if (s->state == HR_PENDING && s->group && hr_group_full(&c->g[s->group])) {
        hr_park(c, i);
        return;
    }
    hr_heap *hp = hr_heap_of(c, s->state);
    if (!hp)
        c->pos[i] = HR_NONE;
    else if (hp == &c->ready)
        hr_mm_push(hp, hr_heap_key(&c->s[i]), i);
    else
        hr_bh_push(hp, hr_heap_key(&c->s[i]), i);
}

void hr_heap_unlink(hr_ctx *c, uint32_t i)
{
    if (c->s[i].flags & HR_F_PARKED) {
        hr_unpark(c, i);
        return;
    }
    hr_heap *hp = hr_heap_of(c, c->s[i].state);
    if (hp == &c->ready)
        hr_mm_remove(hp, c->pos[i]);
    else if (hp)
        hr_bh_remove(hp, c->pos[i]);
}
