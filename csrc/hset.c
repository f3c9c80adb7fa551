#include <string.h>
#include "headrace.h"

/* Keys may be sequential task ids; mix before masking. */
static inline uint64_t mix(uint64_t lo, uint64_t hi)
{
    uint64_t x = lo ^ (hi * 0x9E3779B97F4A7C15ULL);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

uint32_t hr_hs_home(const hr_hset *hs, uint64_t lo, uint64_t hi)
{
    return (uint32_t)mix(lo, hi) & hs->mask;
}

int64_t hr_hs_find(const hr_hset *hs, uint64_t lo, uint64_t hi)
{
    uint32_t i = hr_hs_home(hs, lo, hi);
    for (;;) {
        const hr_bucket *b = &hs->t[i];
        if (b->slot1 == 0)
            return -1;
        if (b->lo == lo && b->hi == hi)
            return i;
        i = (i + 1) & hs->mask;
    }
}

int hr_hs_insert(hr_hset *hs, uint64_t lo, uint64_t hi, uint32_t slot)
{
    uint32_t i = hr_hs_home(hs, lo, hi);
    for (;;) {
        hr_bucket *b = &hs->t[i];
        if (b->slot1 == 0) {
            b->lo = lo;
            b->hi = hi;
            b->slot1 = slot + 1;
            (*hs->n)++;
            return HR_OK;
        }
        if (b->lo == lo && b->hi == hi)
            return HR_E_DUPLICATE;
        i = (i + 1) & hs->mask;
    }
}

int hr_hs_erase(hr_hset *hs, uint64_t lo, uint64_t hi)
{
    int64_t f = hr_hs_find(hs, lo, hi);
    if (f < 0)
        return HR_E_NOT_FOUND;
    uint32_t i = (uint32_t)f, j = i;
    /* Backward shift: pull later members of the run into the hole when the
     * hole lies cyclically between their home and their position. */
    for (;;) {
        j = (j + 1) & hs->mask;
        hr_bucket *b = &hs->t[j];
        if (b->slot1 == 0)
            break;
        uint32_t k = hr_hs_home(hs, b->lo, b->hi);
        if (((j - k) & hs->mask) >= ((j - i) & hs->mask)) {
            hs->t[i] = *b;
            i = j;
        }
    }
    hs->t[i].slot1 = 0;
    (*hs->n)--;
    return HR_OK;
}

void hr_hs_clear(hr_hset *hs)
{
    memset(hs->t, 0, ((size_t)hs->mask + 1) * sizeof(hr_bucket));
    *hs->n = 0;
}
