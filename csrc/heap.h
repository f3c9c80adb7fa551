/* Heaps over inline-keyed entries, each keeping every slot's position in a
 * compact u32 array (`pos`, 4 bytes a slot rather than a field in an 80-byte
 * record: sifts touch far fewer cache lines), so that any entry can be
 * removed in O(log n).
 *
 * - The ready heap is a min-max heap: the claim path pops the best (min key)
 *   and the spill path evicts the worst (max key), both in O(log n).
 * - The timer heaps (delay, lease) are binary min-heaps: their new keys are
 *   mostly the largest so far, which a binary heap inserts in O(1).
 */
#ifndef HR_HEAP_H
#define HR_HEAP_H

#include "layout.h"

typedef struct hr_heap {
    hr_hent *a;
    uint32_t *n;
    uint32_t *pos;
} hr_heap;

/* min-max heap */
void hr_mm_push(hr_heap *hp, uint64_t key, uint32_t slot);
hr_hent hr_mm_pop_min(hr_heap *hp);
uint32_t hr_mm_max_pos(const hr_heap *hp);
void hr_mm_remove(hr_heap *hp, uint32_t pos);
void hr_mm_heapify(hr_heap *hp);
int hr_mm_check(const hr_heap *hp);

/* binary min-heap */
void hr_bh_push(hr_heap *hp, uint64_t key, uint32_t slot);
hr_hent hr_bh_pop(hr_heap *hp);
void hr_bh_remove(hr_heap *hp, uint32_t pos);
void hr_bh_rekey(hr_heap *hp, uint32_t pos, uint64_t key);
void hr_bh_heapify(hr_heap *hp);
int hr_bh_check(const hr_heap *hp);

#endif
