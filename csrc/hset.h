/* Open-addressing hash set of 128-bit keys mapping to a slot, with linear
 * probing and backward-shift deletion (no tombstones, so probe chains never
 * rot).  The table has at least twice as many buckets as the segment has
 * slots, so the load factor never exceeds 1/2.
 *
 * Two instances live in the segment: the dedup set, keyed by a 128-bit hash
 * of (queue, dedup key), and the id index, keyed by (task id, 0).
 *
 * Why 128 bits is enough for dedup: keys are compared by hash only, so two
 * distinct keys that collide would wrongly dedup.  With n live keys the
 * birthday bound puts that chance at about n^2 / 2^129: for a billion live
 * keys, ~1.5e-21 -- far below the odds of undetected memory or disk errors.
 */
#ifndef HR_HSET_H
#define HR_HSET_H

#include "layout.h"

typedef struct hr_hset {
    hr_bucket *t;
    uint32_t mask;   /* buckets - 1 */
    uint32_t *n;
} hr_hset;

int64_t hr_hs_find(const hr_hset *hs, uint64_t lo, uint64_t hi);        /* bucket or -1 */
int hr_hs_insert(hr_hset *hs, uint64_t lo, uint64_t hi, uint32_t slot); /* 0 ok, HR_E_DUPLICATE */
int hr_hs_erase(hr_hset *hs, uint64_t lo, uint64_t hi);                 /* 0 ok, HR_E_NOT_FOUND */
void hr_hs_clear(hr_hset *hs);
uint32_t hr_hs_home(const hr_hset *hs, uint64_t lo, uint64_t hi);

#endif
