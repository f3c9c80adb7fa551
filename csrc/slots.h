/* The slot table: allocation, the undo journal and state bookkeeping. */
#ifndef HR_SLOTS_H
#define HR_SLOTS_H

#include <string.h>
#include "segment.h"

/* Ready-heap key, smaller is better: priority descending, then FIFO. */
static inline uint64_t hr_rkey(const hr_slot *s)
{
    return ((uint64_t)(255u - s->prio) << 56) | (s->seq & ((1ULL << 56) - 1));
}

/* The heap a slot in `state` lives in (NULL: none), and its key there.
 * The one place that ties states to heaps: linking, unlinking, the rebuild
 * and verify all ask here. */
static inline hr_heap *hr_heap_of(hr_ctx *c, uint8_t state)
{
    switch (state) {
    case HR_PENDING: return &c->ready;
    case HR_DELAYED: return &c->delay;
    case HR_RUNNING: return &c->lease;
    default: return NULL;
    }
}

/* Like hr_heap_of, for one slot: a parked pending task is in no heap. */
static inline hr_heap *hr_heap_of_slot(hr_ctx *c, const hr_slot *s)
{
    return (s->flags & HR_F_PARKED) ? NULL : hr_heap_of(c, s->state);
}

static inline uint64_t hr_heap_key(const hr_slot *s)
{
    switch (s->state) {
    case HR_PENDING: return hr_rkey(s);
    case HR_DELAYED: return (uint64_t)s->run_at;
    default: return (uint64_t)s->lease_until;
    }
}

/* Journal slot i before changing it; a holder killed before hr_slot_end is
 * rolled back to this copy by the repair. */
static inline void hr_slot_begin(hr_ctx *c, uint32_t i)
{
    memcpy(&c->h->undo, &c->s[i], sizeof(hr_slot));
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    c->h->undo_idx = i;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
}

static inline void hr_slot_end(hr_ctx *c)
{
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    c->h->undo_idx = HR_NONE;
}

static inline void hr_slot_state(hr_ctx *c, hr_slot *s, uint8_t st)
{
    c->h->count[s->state]--;
    c->h->count[st]++;
    if (s->group) {
        if (s->state == HR_RUNNING)
            c->g[s->group].running--;
        if (st == HR_RUNNING)
            c->g[s->group].running++;
    }
    s->state = st;
}

/* A change that must reach disk: new version, and into the ring once. */
static inline void hr_slot_touch(hr_ctx *c, hr_slot *s, uint32_t i)
{
    if (++s->version == 0)
        s->version = 1;
    if (!s->dirty) {
        s->dirty = 1;
        hr_ring_push(&c->ring, i);
    }
}

uint32_t hr_slot_alloc(hr_ctx *c);
void hr_slot_release(hr_ctx *c, uint32_t i);
void hr_heap_link(hr_ctx *c, uint32_t i);
void hr_heap_unlink(hr_ctx *c, uint32_t i);

#endif
