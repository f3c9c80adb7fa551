/* The dirty-id ring: slots whose state must reach disk.
 *
 * A slot is in the ring at most once (its `dirty` flag says so), so a ring
 * as large as the slot table never overflows.  The consumer peeks a batch,
 * writes it, and only after its commit advances past it; a consumer that
 * dies between the two loses nothing.  Each entry remembers the slot
 * version seen at the peek: on advance, a slot changed since then is put
 * back at the tail instead of being marked clean.
 */
#ifndef HR_RING_H
#define HR_RING_H

#include "layout.h"

typedef struct hr_ring {
    hr_rent *e;
    uint32_t cap;
    uint32_t *head;
    uint32_t *len;
} hr_ring;

static inline void hr_ring_push(hr_ring *r, uint32_t slot)
{
    uint32_t t = *r->head + *r->len;
    if (t >= r->cap)
        t -= r->cap;
    r->e[t].slot = slot;
    r->e[t].seen = 0; /* versions are never 0: an unpeeked entry never matches */
    (*r->len)++;
}

static inline hr_rent *hr_ring_at(hr_ring *r, uint32_t k)
{
    uint32_t t = *r->head + k;
    if (t >= r->cap)
        t -= r->cap;
    return &r->e[t];
}

static inline hr_rent hr_ring_pop(hr_ring *r)
{
    hr_rent x = r->e[*r->head];
    uint32_t h = *r->head + 1;
    *r->head = h >= r->cap ? 0 : h;
    (*r->len)--;
    return x;
}

#endif
