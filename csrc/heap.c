#include "headrace.h"

static inline void put(hr_heap *hp, uint32_t i, hr_hent e)
{
    hp->a[i] = e;
    hp->pos[e.slot] = i;
}

static inline void swap(hr_heap *hp, uint32_t i, uint32_t j)
{
    hr_hent t = hp->a[i];
    put(hp, i, hp->a[j]);
    put(hp, j, t);
}

static inline uint64_t K(const hr_heap *hp, uint32_t i) { return hp->a[i].key; }

/* ---- min-max heap (Atkinson et al. 1986), 0-based ---------------------- */

/* Even depths are min levels, odd depths max levels. */
static inline int min_level(uint32_t i)
{
    return ((31 - __builtin_clz(i + 1)) & 1) == 0;
}

static void up_min(hr_heap *hp, uint32_t i)
{
    while (i >= 3) {
        uint32_t g = (((i - 1) >> 1) - 1) >> 1;
        if (K(hp, i) >= K(hp, g))
            break;
        swap(hp, i, g);
        i = g;
    }
}

static void up_max(hr_heap *hp, uint32_t i)
{
    while (i >= 3) {
        uint32_t g = (((i - 1) >> 1) - 1) >> 1;
        if (K(hp, i) <= K(hp, g))
            break;
        swap(hp, i, g);
        i = g;
    }
}

static void mm_up(hr_heap *hp, uint32_t i)
{
    if (i == 0)
        return;
    uint32_t p = (i - 1) >> 1;
    if (min_level(i)) {
        if (K(hp, i) > K(hp, p)) {
            swap(hp, i, p);
            up_max(hp, p);
        } else {
            up_min(hp, i);
        }
    } else {
        if (K(hp, i) < K(hp, p)) {
            swap(hp, i, p);
            up_min(hp, p);
        } else {
            up_max(hp, i);
        }
    }
}

/* Index of the extreme key among the children and grandchildren of i. */
static inline uint32_t extreme_below(const hr_heap *hp, uint32_t i, int want_min)
{
    uint32_t n = *hp->n;
    uint32_t best = 2 * i + 1;
    uint32_t cand[5] = {2 * i + 2, 4 * i + 3, 4 * i + 4, 4 * i + 5, 4 * i + 6};
    for (int k = 0; k < 5; k++) {
        uint32_t c = cand[k];
        if (c >= n)
            break;
        if (want_min ? K(hp, c) < K(hp, best) : K(hp, c) > K(hp, best))
            best = c;
    }
    return best;
}

static void mm_down(hr_heap *hp, uint32_t i)
{
    int is_min = min_level(i);
    for (;;) {
        uint32_t n = *hp->n;
        if (2 * i + 1 >= n)
            return;
        uint32_t m = extreme_below(hp, i, is_min);
        int better = is_min ? K(hp, m) < K(hp, i) : K(hp, m) > K(hp, i);
        if (!better)
            return;
        swap(hp, i, m);
        if (m <= 2 * i + 2)
            return; /* a child: it has no grandchildren of i's kind below */
        uint32_t p = (m - 1) >> 1;
        if (is_min ? K(hp, m) > K(hp, p) : K(hp, m) < K(hp, p))
            swap(hp, m, p);
        i = m;
    }
}

void hr_mm_push(hr_heap *hp, uint64_t key, uint32_t slot)
{
    uint32_t i = (*hp->n)++;
    put(hp, i, (hr_hent){.key = key, .slot = slot});
    mm_up(hp, i);
}

void hr_mm_remove(hr_heap *hp, uint32_t pos)
{
    uint32_t last = --(*hp->n);
    hp->pos[hp->a[pos].slot] = HR_NONE;
    if (pos == last)
        return;
    put(hp, pos, hp->a[last]);
    /* After mm_up, whatever sits at pos agrees with its ancestors, so a
     * trickle-down from pos restores the subtree. */
    mm_up(hp, pos);
    mm_down(hp, pos);
}

hr_hent hr_mm_pop_min(hr_heap *hp)
{
    hr_hent e = hp->a[0];
    hr_mm_remove(hp, 0);
    return e;
}

uint32_t hr_mm_max_pos(const hr_heap *hp)
{
    uint32_t n = *hp->n;
    if (n <= 1)
        return 0;
    if (n == 2)
        return 1;
    return K(hp, 1) >= K(hp, 2) ? 1 : 2;
}

void hr_mm_heapify(hr_heap *hp)
{
    uint32_t n = *hp->n;
    for (uint32_t i = 0; i < n; i++)
        hp->pos[hp->a[i].slot] = i;
    for (uint32_t i = n / 2; i-- > 0;)
        mm_down(hp, i);
}

/* Local parent/grandparent checks imply the global min-max property. */
int hr_mm_check(const hr_heap *hp)
{
    uint32_t n = *hp->n;
    for (uint32_t i = 1; i < n; i++) {
        uint32_t p = (i - 1) >> 1;
        if (min_level(i)) {
            if (K(hp, i) > K(hp, p))
                return 0;
            if (i >= 3 && K(hp, i) < K(hp, (p - 1) >> 1))
                return 0;
        } else {
            if (K(hp, i) < K(hp, p))
                return 0;
            if (i >= 3 && K(hp, i) > K(hp, (p - 1) >> 1))
                return 0;
        }
    }
    return 1;
}

/* ---- binary min-heap ---------------------------------------------------- */

static void bh_up(hr_heap *hp, uint32_t i)
{
    hr_hent e = hp->a[i];
    while (i > 0) {
        uint32_t p = (i - 1) >> 1;
        if (hp->a[p].key <= e.key)
            break;
        put(hp, i, hp->a[p]);
        i = p;
    }
    put(hp, i, e);
}

static void bh_down(hr_heap *hp, uint32_t i)
{
    uint32_t n = *hp->n;
    hr_hent e = hp->a[i];
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && hp->a[c + 1].key < hp->a[c].key)
            c++;
        if (hp->a[c].key >= e.key)
            break;
        put(hp, i, hp->a[c]);
        i = c;
    }
    put(hp, i, e);
}

void hr_bh_push(hr_heap *hp, uint64_t key, uint32_t slot)
{
    uint32_t i = (*hp->n)++;
    hp->a[i] = (hr_hent){.key = key, .slot = slot};
    bh_up(hp, i);
}

void hr_bh_remove(hr_heap *hp, uint32_t pos)
{
    uint32_t last = --(*hp->n);
    hp->pos[hp->a[pos].slot] = HR_NONE;
    if (pos == last)
        return;
    put(hp, pos, hp->a[last]);
    if (pos > 0 && K(hp, (pos - 1) >> 1) > K(hp, pos))
        bh_up(hp, pos);
    else
        bh_down(hp, pos);
}

hr_hent hr_bh_pop(hr_heap *hp)
{
    hr_hent e = hp->a[0];
    hr_bh_remove(hp, 0);
    return e;
}

void hr_bh_rekey(hr_heap *hp, uint32_t pos, uint64_t key)
{
    hp->a[pos].key = key;
    bh_up(hp, pos);
    bh_down(hp, hp->pos[hp->a[pos].slot]);
}

void hr_bh_heapify(hr_heap *hp)
{
    uint32_t n = *hp->n;
    for (uint32_t i = 0; i < n; i++)
        hp->pos[hp->a[i].slot] = i;
    for (uint32_t i = n / 2; i-- > 0;)
        bh_down(hp, i);
}

int hr_bh_check(const hr_heap *hp)
{
    uint32_t n = *hp->n;
    for (uint32_t i = 1; i < n; i++)
        if (K(hp, (i - 1) >> 1) > K(hp, i))
            return 0;
    return 1;
}
