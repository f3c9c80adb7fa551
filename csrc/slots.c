#include "headrace.h"

uint64_t hr_ready_key(const hr_slot *s) { return hr_rkey(s); }

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
    memset(s, 0, sizeof *s);
    c->pos[i] = c->h->free_head;
    hr_slot_end(c);
    c->h->free_head = i;
    c->h->nfree++;
}

/* Put slot i into the heap its state calls for. */
void hr_heap_link(hr_ctx *c, uint32_t i)
{
    hr_slot *s = &c->s[i];
    switch (s->state) {
    case HR_PENDING: hr_mm_push(&c->ready, hr_rkey(s), i); break;
    case HR_DELAYED: hr_bh_push(&c->delay, (uint64_t)s->run_at, i); break;
    case HR_RUNNING: hr_bh_push(&c->lease, (uint64_t)s->lease_until, i); break;
    default: c->pos[i] = HR_NONE;
    }
}

void hr_heap_unlink(hr_ctx *c, uint32_t i)
{
    hr_slot *s = &c->s[i];
    switch (s->state) {
    case HR_PENDING: hr_mm_remove(&c->ready, c->pos[i]); break;
    case HR_DELAYED: hr_bh_remove(&c->delay, c->pos[i]); break;
    case HR_RUNNING: hr_bh_remove(&c->lease, c->pos[i]); break;
    default: break;
    }
}
