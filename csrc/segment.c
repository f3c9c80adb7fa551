#include <errno.h>
#include <stdio.h>
#include <string.h>
#include "headrace.h"

/* Trylock attempts before blocking.  A robust mutex never spins by itself,
 * and a sleep/wake pair costs far more than a typical critical section. */
static uint32_t lock_spin = 100;

void hr_set_lock_spin(uint32_t spins) { lock_spin = spins; }

static inline uint64_t align64(uint64_t x) { return (x + 63) & ~(uint64_t)63; }

typedef struct layout {
    uint64_t slots, ready, delay, lease, dedup, ids, ring, pos, groups, glinks, req, jc, total;
    uint32_t buckets;
} layout;

static int compute_layout(uint32_t cap, uint64_t req_bytes, layout *L)
{
    if (cap == 0 || cap > HR_MAX_CAPACITY)
        return HR_E_INVALID;
    if (req_bytes < HR_REQ_MIN || req_bytes > HR_REQ_MAX || (req_bytes & (req_bytes - 1)))
        return HR_E_INVALID;
    uint32_t b = 16;
    while (b < 2 * cap)
        b <<= 1;
    L->buckets = b;
    uint64_t off = align64(sizeof(hr_header));
    L->slots = off;  off = align64(off + (uint64_t)cap * sizeof(hr_slot));
    L->ready = off;  off = align64(off + (uint64_t)cap * sizeof(hr_hent));
    L->delay = off;  off = align64(off + (uint64_t)cap * sizeof(hr_hent));
    L->lease = off;  off = align64(off + (uint64_t)cap * sizeof(hr_hent));
    L->dedup = off;  off = align64(off + (uint64_t)b * sizeof(hr_bucket));
    L->ids = off;    off = align64(off + (uint64_t)b * sizeof(hr_bucket));
    L->ring = off;   off = align64(off + (uint64_t)cap * sizeof(hr_rent));
    L->pos = off;    off = align64(off + (uint64_t)cap * sizeof(uint32_t));
    /* Found from off_pos and the capacity (see hr_ctx_of), so the header
     * needs no field for them. */
    L->groups = off; off = align64(off + (uint64_t)HR_MAX_GROUPS * sizeof(hr_group));
    L->glinks = off; off = align64(off + (uint64_t)cap * sizeof(hr_glink));
    /* The request area and the job cache last, so that init can skip
     * zeroing them (each is only ever read where it was written). */
    L->req = off;    off = align64(off + req_bytes);
    L->jc = off;     off += (uint64_t)cap * HR_JC_PER_SLOT;
    L->total = (off + 4095) & ~(uint64_t)4095;
    return HR_OK;
}

uint64_t hr_segment_size(uint32_t capacity, uint64_t req_bytes)
{
    layout L;
    return compute_layout(capacity, req_bytes, &L) == HR_OK ? L.total : 0;
}

/* FNV-1a over the immutable part of the header after the magic (which is
 * published last). */
static uint64_t header_sum(const hr_header *h)
{
    const unsigned char *p = (const unsigned char *)h;
    uint64_t x = 0xcbf29ce484222325ULL;
    for (size_t i = offsetof(hr_header, version); i < offsetof(hr_header, checksum); i++) {
        x ^= p[i];
        x *= 0x100000001b3ULL;
    }
    return x;
}

void hr_ctx_of(void *mem, hr_ctx *c)
{
    hr_header *h = (hr_header *)mem;
    char *b = (char *)mem;
    c->h = h;
    c->s = (hr_slot *)(b + h->off_slots);
    c->pos = (uint32_t *)(b + h->off_pos);
    c->ready = (hr_heap){(hr_hent *)(b + h->off_ready), &h->ready_n, c->pos};
    c->delay = (hr_heap){(hr_hent *)(b + h->off_delay), &h->delay_n, c->pos};
    c->lease = (hr_heap){(hr_hent *)(b + h->off_lease), &h->lease_n, c->pos};
    c->dedup = (hr_hset){(hr_bucket *)(b + h->off_dedup), h->buckets - 1, &h->dedup_n};
    c->ids = (hr_hset){(hr_bucket *)(b + h->off_ids), h->buckets - 1, &h->ids_n};
    c->ring = (hr_ring){(hr_rent *)(b + h->off_ring), h->capacity, &h->ring_head, &h->ring_len};
    uint64_t groups = align64(h->off_pos + (uint64_t)h->capacity * sizeof(uint32_t));
    c->g = (hr_group *)(b + groups);
    c->gl = (hr_glink *)(b + align64(groups + (uint64_t)HR_MAX_GROUPS * sizeof(hr_group)));
}

int hr_init(void *mem, uint64_t size, uint32_t capacity, uint64_t req_bytes, uint32_t uid,
            uint64_t generation)
{
    layout L;
    if (mem == NULL || compute_layout(capacity, req_bytes, &L) != HR_OK)
        return HR_E_INVALID;
    if (size < L.total)
        return HR_E_TRUNCATED;
    hr_header *h = (hr_header *)mem;
    /* The mapping is fresh (zero-filled), but a reused file may not be.  The
     * request area is only ever read between head and tail, so it is left
     * alone: zeroing it would fault in every page of it at create. */
    memset(mem, 0, L.req);
    h->version = HR_LAYOUT_VERSION;
    h->header_size = sizeof(hr_header);
    h->total_size = L.total;
    h->generation = generation;
    h->capacity = capacity;
    h->creator_uid = uid;
    h->buckets = L.buckets;
    h->slot_size = sizeof(hr_slot);
    h->off_slots = L.slots;
    h->off_ready = L.ready;
    h->off_delay = L.delay;
    h->off_lease = L.lease;
    h->off_dedup = L.dedup;
    h->off_ids = L.ids;
    h->off_ring = L.ring;
    h->off_pos = L.pos;
    h->off_req = L.req;
    h->req_cap = req_bytes;
    h->off_jc = L.jc;
    h->jc_cap = (uint64_t)capacity * HR_JC_PER_SLOT;

    pthread_mutexattr_t a;
    if (pthread_mutexattr_init(&a) != 0)
        return HR_E_LOCK;
    int rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    if (rc == 0)
        rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    if (rc == 0)
        rc = pthread_mutex_init(&h->lock, &a);
    pthread_mutexattr_destroy(&a);
    if (rc != 0)
        return HR_E_LOCK;

    h->next_seq = 1;
    h->next_id = 1;
    h->undo_idx = HR_NONE;
    hr_ctx c;
    hr_ctx_of(mem, &c);
    hr_rebuild(&c); /* builds the free list and empty indexes */
    h->stats = (hr_counters){0};
    h->ring_epoch = 1;
    h->checksum = header_sum(h);
    /* Publish last: an attacher that sees the magic sees everything. */
    __atomic_store_n(&h->magic, HR_MAGIC, __ATOMIC_RELEASE);
    return HR_OK;
}

/* O(1) bounds on the mutable counters, so that a segment scribbled over by
 * a stray writer is refused instead of sending an index out of the mapping. */
static int counters_sane(const hr_header *h)
{
    uint32_t cap = h->capacity;
    uint64_t rh = __atomic_load_n(&h->req_head, __ATOMIC_ACQUIRE);
    uint64_t rt = __atomic_load_n(&h->req_tail, __ATOMIC_ACQUIRE);
    if (rh > rt || rt - rh > h->req_cap || (rh | rt) % sizeof(hr_req))
        return 0;
    return h->nfree <= cap && h->ready_n <= cap && h->delay_n <= cap && h->lease_n <= cap &&
           h->dedup_n <= cap && h->ids_n <= cap && h->ring_len <= cap && h->ring_head < cap &&
           (h->free_head < cap || h->free_head == HR_NONE) &&
           (h->undo_idx < cap || h->undo_idx == HR_NONE);
}

int hr_attach(void *mem, uint64_t size, uint32_t uid)
{
    if (mem == NULL || size < sizeof(uint64_t) + sizeof(uint32_t))
        return HR_E_TRUNCATED;
    hr_header *h = (hr_header *)mem;
    uint64_t magic = __atomic_load_n(&h->magic, __ATOMIC_ACQUIRE);
    if (magic == 0)
        return HR_E_NOT_READY;
    if (magic != HR_MAGIC)
        return HR_E_BAD_MAGIC;
    if (h->version != HR_LAYOUT_VERSION)
        return HR_E_BAD_VERSION;
    if (size < sizeof(hr_header))
        return HR_E_TRUNCATED;
    if (h->header_size != sizeof(hr_header) || h->slot_size != sizeof(hr_slot))
        return HR_E_BAD_VERSION; /* same layout number, other ABI */
    if (h->checksum != header_sum(h))
        return HR_E_CORRUPT;
    layout L;
    if (compute_layout(h->capacity, h->req_cap, &L) != HR_OK || L.total != h->total_size ||
        L.buckets != h->buckets || L.slots != h->off_slots || L.ready != h->off_ready ||
        L.delay != h->off_delay || L.lease != h->off_lease || L.dedup != h->off_dedup ||
        L.ids != h->off_ids || L.ring != h->off_ring || L.pos != h->off_pos ||
        L.req != h->off_req || h->off_req + h->req_cap > h->total_size || L.jc != h->off_jc ||
        h->jc_cap != (uint64_t)h->capacity * HR_JC_PER_SLOT || h->off_jc + h->jc_cap > h->total_size)
        return HR_E_CORRUPT;
    if (size < h->total_size)
        return HR_E_TRUNCATED;
    if (h->creator_uid != uid)
        return HR_E_FOREIGN_OWNER;
    if (h->poisoned || !counters_sane(h))
        return HR_E_CORRUPT;
    return HR_OK;
}

uint64_t hr_generation(void *mem) { return ((hr_header *)mem)->generation; }

/* ---- rebuild and repair ------------------------------------------------- */

/* Append slot i to its heap unordered; the rebuild heapifies afterwards. */
static void append_heap(hr_ctx *c, uint32_t i)
{
    hr_heap *hp = hr_heap_of_slot(c, &c->s[i]);
    if (hp)
        hp->a[(*hp->n)++] = (hr_hent){hr_heap_key(&c->s[i]), i, 0};
    else
        c->pos[i] = HR_NONE;
}

/* Rebuild every derived structure from the slot table in O(capacity). */
void hr_rebuild(hr_ctx *c)
{
    hr_header *h = c->h;
    uint32_t cap = h->capacity;
    memset(h->count, 0, sizeof h->count);
    h->free_head = HR_NONE;
    h->nfree = 0;
    h->ready_n = h->delay_n = h->lease_n = 0;
    hr_hs_clear(&c->dedup);
    hr_hs_clear(&c->ids);
    h->ring_head = h->ring_len = 0;
    hr_groups_reset(c);
    uint64_t maxseq = 0;
    for (uint32_t i = cap; i-- > 0;) {
        hr_slot *s = &c->s[i];
        if (s->state >= HR_NSTATES) {
            h->poisoned = 1; /* a state we never write: do not guess */
            memset(s, 0, sizeof *s);
        }
        if (s->state == HR_FREE) {
            memset(s, 0, sizeof *s);
            c->pos[i] = h->free_head;
            h->free_head = i;
            h->nfree++;
            h->count[HR_FREE]++;
            continue;
        }
        h->count[s->state]++;
        s->dirty = s->dirty ? 1 : 0; /* a verifier killed mid-scan leaves 2 */
        s->flags &= (uint8_t)~HR_F_PARKED; /* claims park again as needed */
        if (s->group >= HR_MAX_GROUPS) {
            h->poisoned = 1;
            s->group = 0;
        }
        if (s->group)
            c->g[s->group].members++;
        if (s->state == HR_RUNNING && s->group)
            c->g[s->group].running++;
        if (s->id == 0 || hr_hs_insert(&c->ids, s->id, 0, i) != HR_OK)
            h->poisoned = 1;
        if (!HR_TERMINAL(s->state) && (s->flags & HR_F_DEDUP) &&
            hr_hs_insert(&c->dedup, s->dedup_lo, s->dedup_hi, i) != HR_OK)
            h->poisoned = 1;
        append_heap(c, i);
        if (s->dirty)
            hr_ring_push(&c->ring, i);
        if (s->seq > maxseq)
            maxseq = s->seq;
    }
    hr_mm_heapify(&c->ready);
    hr_bh_heapify(&c->delay);
    hr_bh_heapify(&c->lease);
    if (h->next_seq <= maxseq)
        h->next_seq = maxseq + 1;
}

/* Runs with the lock held after EOWNERDEAD.  Idempotent, so a repairer
 * that dies half-way leaves the next locker able to repeat it. */
static void repair(hr_ctx *c)
{
    hr_header *h = c->h;
    HR_FAULT(HR_FS_REPAIR);
    if (h->undo_idx < h->capacity)
        memcpy(&c->s[h->undo_idx], &h->undo, sizeof(hr_slot));
    hr_rebuild(c);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    h->undo_idx = HR_NONE;
    h->ring_epoch++; /* a consumer's earlier peek no longer describes the ring */
    h->stats.repairs++;
}

int hr_lock(hr_ctx *c)
{
    pthread_mutex_t *m = &c->h->lock;
    int rc = EBUSY;
    for (uint32_t k = 0; k < lock_spin; k++) {
        rc = pthread_mutex_trylock(m);
        if (rc == 0 && k > 0)
            c->h->stats.lock_spins_won++;
        if (rc != EBUSY)
            break;
        for (int p = 0; p < 8; p++)
            hr_cpu_relax();
    }
    if (rc == EBUSY) {
        rc = pthread_mutex_lock(m);
        if (rc == 0)
            c->h->stats.lock_sleeps++;
    }
    if (rc == EOWNERDEAD) {
        repair(c);
        pthread_mutex_consistent(m);
        rc = 0;
    }
    if (rc != 0)
        return HR_E_LOCK;
    if (c->h->poisoned) {
        pthread_mutex_unlock(m);
        return HR_E_CORRUPT;
    }
    return HR_OK;
}

void hr_unlock(hr_ctx *c) { pthread_mutex_unlock(&c->h->lock); }

/* ---- verify --------------------------------------------------------------- */

#define FAIL(...) do { snprintf(msg, msglen, __VA_ARGS__); rc = HR_E_CORRUPT; goto out; } while (0)

static int verify_locked(hr_ctx *c, char *msg, uint32_t msglen)
{
    hr_header *h = c->h;
    uint32_t cap = h->capacity;
    uint32_t count[HR_NSTATES] = {0};
    uint32_t ndirty = 0, ndedup = 0;
    hr_heap *heaps[3] = {&c->ready, &c->delay, &c->lease};
    const uint8_t heap_state[3] = {HR_PENDING, HR_DELAYED, HR_RUNNING};
    int rc = HR_OK;
    if (msglen)
        msg[0] = 0;
    if (!counters_sane(h))
        FAIL("a header counter points outside the slot table or the request area");
    if (h->undo_idx != HR_NONE)
        FAIL("undo journal left open for slot %u", h->undo_idx);
    for (uint32_t i = 0; i < cap; i++) {
        hr_slot *s = &c->s[i];
        if (s->state >= HR_NSTATES)
            FAIL("slot %u has state %u", i, s->state);
        count[s->state]++;
        if (s->state == HR_FREE) {
            if (s->dirty || s->id)
                FAIL("free slot %u is dirty or has an id", i);
            continue;
        }
        if (s->id == 0)
            FAIL("live slot %u has id 0", i);
        int64_t f = hr_hs_find(&c->ids, s->id, 0);
        if (f < 0 || c->ids.t[f].slot1 != i + 1)
            FAIL("id %llu of slot %u missing from the id index", (unsigned long long)s->id, i);
        if (s->dirty)
            ndirty++;
        if (!HR_TERMINAL(s->state) && (s->flags & HR_F_DEDUP)) {
            ndedup++;
            f = hr_hs_find(&c->dedup, s->dedup_lo, s->dedup_hi);
            if (f < 0 || c->dedup.t[f].slot1 != i + 1)
                FAIL("dedup key of slot %u missing from the dedup set", i);
        }
        hr_heap *hp = hr_heap_of_slot(c, s);
        if (hp) {
            uint32_t at = c->pos[i];
            if (at >= *hp->n || hp->a[at].slot != i)
                FAIL("slot %u (state %u) not at its heap position %u", i, s->state, at);
            if (hp->a[at].key != hr_heap_key(s))
                FAIL("heap key of slot %u is stale", i);
        }
    }
    for (int s = 0; s < HR_NSTATES; s++)
        if (count[s] != h->count[s])
            FAIL("count of state %d is %u, header says %u", s, count[s], h->count[s]);
    if (count[HR_FREE] != h->nfree)
        FAIL("%u free slots, header says %u", count[HR_FREE], h->nfree);
    {
        uint32_t n = 0;
        for (uint32_t i = h->free_head; i != HR_NONE; i = c->pos[i]) {
            if (i >= cap || c->s[i].state != HR_FREE || ++n > cap)
                FAIL("free list broken at slot %u", i);
        }
        if (n != h->nfree)
            FAIL("free list has %u slots, expected %u", n, h->nfree);
    }
    if ((rc = hr_groups_check(c, msg, msglen)) != HR_OK)
        goto out;
    for (int k = 0; k < 3; k++) {
        uint32_t outside = 0; /* pending tasks parked by their full group */
        if (k == 0)
            for (uint32_t g = 1; g < HR_MAX_GROUPS; g++)
                outside += c->g[g].parked;
        if (count[heap_state[k]] != *heaps[k]->n + outside)
            FAIL("heap %d holds %u entries for %u slots", k, *heaps[k]->n, count[heap_state[k]]);
        if (!(k == 0 ? hr_mm_check(heaps[k]) : hr_bh_check(heaps[k])))
            FAIL("heap %d order violated", k);
    }
    if (ndedup != h->dedup_n)
        FAIL("dedup set holds %u keys for %u slots", h->dedup_n, ndedup);
    if (cap - h->nfree != h->ids_n)
        FAIL("id index holds %u ids for %u live slots", h->ids_n, cap - h->nfree);
    hr_hset *sets[2] = {&c->dedup, &c->ids};
    for (int k = 0; k < 2; k++) {
        hr_hset *hs = sets[k];
        for (uint32_t b = 0; b <= hs->mask; b++) {
            hr_bucket *e = &hs->t[b];
            if (!e->slot1)
                continue;
            if (e->slot1 > cap)
                FAIL("hash set %d bucket %u points outside the slot table", k, b);
            /* No empty bucket may sit between a key's home and its bucket. */
            for (uint32_t j = hr_hs_home(hs, e->lo, e->hi); j != b; j = (j + 1) & hs->mask)
                if (!hs->t[j].slot1)
                    FAIL("hash set %d probe chain broken at bucket %u", k, b);
        }
    }
    if (h->ring_len != ndirty || h->ring_head >= cap)
        FAIL("ring holds %u entries for %u dirty slots", h->ring_len, ndirty);
    for (uint32_t k = 0; k < h->ring_len; k++) {
        hr_rent *e = hr_ring_at(&c->ring, k);
        if (e->slot >= cap || c->s[e->slot].dirty != 1)
            FAIL("ring entry %u names a clean or repeated slot %u", k, e->slot);
        c->s[e->slot].dirty = 2; /* mark seen */
    }
    for (uint32_t i = 0; i < cap; i++) {
        if (c->s[i].dirty == 1)
            FAIL("dirty slot %u missing from the ring", i);
        if (c->s[i].dirty == 2)
            c->s[i].dirty = 1;
    }
    rc = hr_req_verify(h, msg, msglen);
out:
    if (rc != HR_OK)
        for (uint32_t i = 0; i < cap; i++)
            if (c->s[i].dirty == 2)
                c->s[i].dirty = 1;
    return rc;
}

int hr_verify(void *mem, char *msg, uint32_t msglen)
{
    hr_ctx c;
    hr_ctx_of(mem, &c);
    int rc = hr_lock(&c);
    if (rc != HR_OK)
        return rc;
    rc = verify_locked(&c, msg, msglen);
    hr_unlock(&c);
    return rc;
}

uint32_t hr_pending_count(void *mem)
{
    const hr_header *h = (const hr_header *)mem;
    return __atomic_load_n(&h->count[HR_PENDING], __ATOMIC_RELAXED);
}

int hr_get_info(void *mem, hr_info *out)
{
    hr_ctx c;
    hr_ctx_of(mem, &c);
    int rc = hr_lock(&c);
    if (rc != HR_OK)
        return rc;
    hr_header *h = c.h;
    out->generation = h->generation;
    out->capacity = h->capacity;
    out->nfree = h->nfree;
    memcpy(out->count, h->count, sizeof out->count);
    out->ring_size = h->ring_len;
    out->ring_epoch = h->ring_epoch;
    out->next_seq = h->next_seq;
    out->next_id = h->next_id;
    out->req_head = __atomic_load_n(&h->req_head, __ATOMIC_ACQUIRE);
    out->req_tail = h->req_tail;
    out->req_cap = h->req_cap;
    out->next_run_at = h->delay_n ? (int64_t)c.delay.a[0].key : 0;
    out->stats = h->stats;
    hr_unlock(&c);
    return HR_OK;
}
