#include <math.h>
#include "headrace.h"

int hr_reserve_seq(void *mem, uint32_t n, uint64_t *first)
{
    LOCKED(c, mem);
    *first = c.h->next_seq;
    c.h->next_seq += n;
    hr_unlock(&c);
    return HR_OK;
}

static int insert_one(hr_ctx *c, const hr_task *t)
{
    if (t->id == 0 || (t->state != HR_PENDING && t->state != HR_DELAYED && t->state != HR_WAITING) ||
        (t->flags & ~HR_F_DEDUP) || t->seq >= (1ULL << 56) || (t->bo_kind & ~HR_BO_JITTER) > HR_BO_EXPONENTIAL ||
        t->group >= HR_MAX_GROUPS)
        return HR_E_INVALID;
    if (hr_hs_find(&c->ids, t->id, 0) >= 0)
        return HR_E_INVALID; /* the id is already live here */
    if ((t->flags & HR_F_DEDUP) && hr_hs_find(&c->dedup, t->dedup_lo, t->dedup_hi) >= 0)
        return HR_E_DUPLICATE;
    uint32_t i = hr_slot_alloc(c);
    if (i == HR_NONE)
        return HR_E_FULL;
    hr_slot *s = &c->s[i];
    hr_slot_begin(c, i);
    s->id = t->id;
    s->seq = t->seq ? t->seq : c->h->next_seq++;
    if (t->seq >= c->h->next_seq)
        c->h->next_seq = t->seq + 1;
    s->run_at = t->run_at;
    s->lease_until = 0;
    s->deadline = 0;
    s->dedup_lo = t->dedup_lo;
    s->dedup_hi = t->dedup_hi;
    s->aux = t->aux;
    s->attempt = t->attempt;
    s->max_attempts = t->max_attempts;
    s->group = t->group;
    if (s->group)
        c->g[s->group].members++;
    s->version = 1;
    s->timeout_ms = t->timeout_ms;
    s->progress = 0;
    s->bo_base_ms = t->bo_base_ms;
    s->bo_cap_ms = t->bo_cap_ms;
    s->bo_kind = t->bo_kind;
    s->prio = t->prio;
    s->dirty = 0;
    s->flags = t->flags;
    HR_FAULT(HR_FS_INSERT);
    hr_slot_state(c, s, t->state);
    hr_slot_end(c);
    hr_hs_insert(&c->ids, t->id, 0, i);
    if (t->flags & HR_F_DEDUP)
        hr_hs_insert(&c->dedup, t->dedup_lo, t->dedup_hi, i);
    hr_heap_link(c, i);
    c->h->stats.inserted++;
    return (int)i;
}

int hr_insert_batch(void *mem, const hr_task *tasks, uint32_t n, int32_t *out)
{
    LOCKED(c, mem);
    int ok = 0;
    uint32_t pending = 0;
    for (uint32_t k = 0; k < n; k++) {
        int r = insert_one(&c, &tasks[k]);
        out[k] = r;
        if (r >= 0) {
            ok++;
            pending += tasks[k].state == HR_PENDING;
        }
    }
    hr_unlock(&c);
    /* One wake-up per batch, for as many claimers as it has tasks: every
     * woken claimer claims until nothing is pending, so none is stranded. */
    hr_notify_n(mem, HR_EV_PENDING, pending);
    return ok;
}

int hr_claim(void *mem, uint32_t max, int64_t now, int64_t lease_until, int start, hr_ticket *out)
{
    LOCKED(c, mem);
    uint32_t k = 0;
    while (k < max && c.h->ready_n > 0) {
        uint32_t i = hr_mm_pop_min(&c.ready).slot;
        hr_slot *s = &c.s[i];
        if (s->group && hr_group_full(&c.g[s->group])) {
            hr_park(&c, i); /* its group runs at its limit: wait there, let others pass */
            continue;
        }
        hr_slot_begin(&c, i);
        s->attempt++;
        /* Without `start`, the claimer starts each attempt's clock itself (hr_clock). */
        s->deadline = start && s->timeout_ms ? now + (int64_t)s->timeout_ms * 1000 : 0;
        /* The lease never outlives the deadline: expiry is what enforces both. */
        s->lease_until = s->deadline && s->deadline < lease_until ? s->deadline : lease_until;
        s->progress = 0;
        HR_FAULT(HR_FS_CLAIM);
        hr_slot_state(&c, s, HR_RUNNING);
        hr_slot_touch(&c, s, i);
        hr_slot_end(&c);
        hr_heap_link(&c, i);
        out[k++] = (hr_ticket){s->id, i, s->attempt};
    }
    c.h->stats.claimed += k;
    hr_unlock(&c);
    return (int)k;
}

static inline hr_slot *fenced_slot(hr_ctx *c, const hr_ticket *t)
{
    if (t->slot >= c->h->capacity)
        return NULL;
    hr_slot *s = &c->s[t->slot];
    if (s->id != t->id || s->state != HR_RUNNING || s->attempt != t->attempt)
        return NULL;
    return s;
}

/* fenced_slot, counting a refused ticket. */
static inline hr_slot *attempt_slot(hr_ctx *c, const hr_ticket *t)
{
    hr_slot *s = fenced_slot(c, t);
    if (!s)
        c->h->stats.fenced++;
    return s;
}

/* After running slot i changed state: a terminal task gives up its dedup
 * key, a live one goes into the heap of its new state, and its group has
 * room for one more. */
/* Returns how many parked tasks of its group the move let go (see hr_group_freed). */
static uint32_t relink(hr_ctx *c, uint32_t i)
{
    hr_slot *s = &c->s[i];
    if (HR_TERMINAL(s->state)) {
        if (s->flags & HR_F_DEDUP)
            hr_hs_erase(&c->dedup, s->dedup_lo, s->dedup_hi);
    } else {
        hr_heap_link(c, i);
    }
    return hr_group_freed(c, s->group);
}

int hr_finish_batch(void *mem, const hr_ticket *t, uint32_t n, uint8_t state,
                    int64_t run_at, uint64_t aux, int32_t *out)
{
    if (state != HR_COMPLETED && state != HR_DEAD && state != HR_CANCELLED &&
        state != HR_PENDING && state != HR_DELAYED)
        return HR_E_INVALID;
    LOCKED(c, mem);
    int ok = 0;
    uint32_t freed = 0;
    for (uint32_t k = 0; k < n; k++) {
        hr_slot *s = attempt_slot(&c, &t[k]);
        if (!s) {
            if (out)
                out[k] = HR_E_STALE;
            continue;
        }
        uint32_t i = t[k].slot;
        hr_heap_unlink(&c, i);
        hr_slot_begin(&c, i);
        s->aux = aux;
        if (state == HR_DELAYED)
            s->run_at = run_at;
        HR_FAULT(HR_FS_FINISH);
        hr_slot_state(&c, s, state);
        hr_slot_touch(&c, s, i);
        hr_slot_end(&c);
        freed += relink(&c, i);
        if (out)
            out[k] = HR_OK;
        ok++;
    }
    c.h->stats.finished += ok;
    hr_unlock(&c);
    if (ok)
        hr_notify(mem, state == HR_PENDING ? HR_EV_PENDING : HR_EV_FINISH);
    /* A freed group place lets a parked task go: someone must claim it. */
    if (state != HR_PENDING)
        hr_notify_n(mem, HR_EV_PENDING, freed);
    return ok;
}

int hr_finish_one(void *mem, uint64_t id, uint32_t slot, uint32_t attempt, uint8_t state, int64_t run_at, uint64_t aux)
{
    hr_ticket t = {id, slot, attempt};
    int32_t status = 0;
    int rc = hr_finish_batch(mem, &t, 1, state, run_at, aux, &status);
    return rc < 0 ? rc : status;
}

/* Set a running attempt's deadline (0: none) and renew its lease to
 * `lease_until`, never past the deadline.  -1 keeps the deadline it has. */
static int renew(void *mem, const hr_ticket *t, int64_t now, int64_t lease_until, int start)
{
    LOCKED(c, mem);
    hr_slot *s = attempt_slot(&c, t);
    if (s) {
        int64_t deadline = start < 0 ? s->deadline : start && s->timeout_ms ? now + (int64_t)s->timeout_ms * 1000 : 0;
        if (deadline && deadline < lease_until)
            lease_until = deadline;
        hr_slot_begin(&c, t->slot);
        s->deadline = deadline;
        s->lease_until = lease_until;
        HR_FAULT(HR_FS_HEARTBEAT);
        hr_slot_end(&c);
        hr_bh_rekey(&c.lease, c.pos[t->slot], (uint64_t)lease_until);
    }
    hr_unlock(&c);
    return s ? HR_OK : HR_E_STALE;
}

int hr_heartbeat(void *mem, const hr_ticket *t, int64_t lease_until)
{
    return renew(mem, t, 0, lease_until, -1);
}

/* Start a running attempt's processing clock (its deadline is `now` plus
 * its timeout), or stop it (`start` 0: the attempt ended and its outcome is
 * on its way to the writer; only the lease applies), renewing the lease. */
int hr_clock(void *mem, const hr_ticket *t, int64_t now, int64_t lease_until, int start)
{
    return renew(mem, t, now, lease_until, start ? 1 : 0);
}

static int find_id(hr_ctx *c, uint64_t id)
{
    int64_t b = hr_hs_find(&c->ids, id, 0);
    return b < 0 ? HR_E_NOT_FOUND : (int)(c->ids.t[b].slot1 - 1);
}

int hr_cancel(void *mem, uint64_t id)
{
    LOCKED(c, mem);
    uint32_t freed = 0;
    int i = find_id(&c, id);
    if (i >= 0) {
        hr_slot *s = &c.s[i];
        if (HR_TERMINAL(s->state)) {
            i = HR_E_STATE;
        } else {
            hr_heap_unlink(&c, (uint32_t)i);
            hr_slot_begin(&c, (uint32_t)i);
            HR_FAULT(HR_FS_CANCEL);
            hr_slot_state(&c, s, HR_CANCELLED);
            hr_slot_touch(&c, s, (uint32_t)i);
            hr_slot_end(&c);
            if (s->flags & HR_F_DEDUP)
                hr_hs_erase(&c.dedup, s->dedup_lo, s->dedup_hi);
            /* A running task frees a place; a pending one may have been the
             * group's only unparked task. */
            freed = hr_group_freed(&c, s->group);
        }
    }
    hr_unlock(&c);
    if (i >= 0)
        hr_notify(mem, HR_EV_FINISH);
    hr_notify_n(mem, HR_EV_PENDING, freed);
    return i;
}

int hr_get(void *mem, uint64_t id, hr_slot *out)
{
    LOCKED(c, mem);
    int i = find_id(&c, id);
    if (i >= 0)
        *out = c.s[i];
    hr_unlock(&c);
    return i;
}

int hr_read_slot(void *mem, uint32_t slot, hr_slot *out)
{
    LOCKED(c, mem);
    int rc = HR_E_INVALID;
    if (slot < c.h->capacity) {
        *out = c.s[slot];
        rc = HR_OK;
    }
    hr_unlock(&c);
    return rc;
}

/* Running tasks whose lease ran out go back to pending.  The tickets
 * returned are the attempts that are now stale. */
int64_t hr_backoff_us(uint8_t kind, uint32_t base_ms, uint32_t cap_ms, uint32_t attempt, uint64_t rnd)
{
    if (attempt == 0)
        attempt = 1;
    double d;
    switch (kind & ~HR_BO_JITTER) {
    case HR_BO_CONSTANT: d = base_ms; break;
    case HR_BO_LINEAR: d = (double)base_ms * attempt; break;
    case HR_BO_EXPONENTIAL: d = ldexp((double)base_ms, attempt > 1000 ? 1000 : (int)attempt - 1); break;
    default: return 0;
    }
    if (cap_ms && d > cap_ms)
        d = cap_ms;
    if (d > 1e12) /* about 31 years: keeps the microseconds in range */
        d = 1e12;
    if (kind & HR_BO_JITTER) /* full jitter: uniform over [0, d] */
        d *= (double)(rnd >> 11) * (1.0 / 9007199254740992.0);
    return (int64_t)(d * 1000.0);
}

/* A splitmix64 step: jitter needs spread, not secrecy. */
static uint64_t mix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

/* Where a running attempt that ended without success goes next: dead once
 * its attempts are used up or no retry is wanted, else pending, or delayed
 * by `delay_us` (< 0: by the slot's backoff). */
static uint8_t next_state(hr_slot *s, int64_t now, int retry, int64_t delay_us)
{
    if (!retry || (s->max_attempts && s->attempt >= s->max_attempts))
        return HR_DEAD;
    if (delay_us < 0)
        delay_us = hr_backoff_us(s->bo_kind, s->bo_base_ms, s->bo_cap_ms, s->attempt,
                                 mix64(s->id ^ ((uint64_t)s->attempt << 40) ^ (uint64_t)now));
    if (delay_us <= 0)
        return HR_PENDING;
    s->run_at = now + delay_us;
    return HR_DELAYED;
}

/* Move running slot i to `state` (run_at already set for DELAYED). */
static void settle(hr_ctx *c, uint32_t i, uint8_t state)
{
    hr_slot *s = &c->s[i];
    hr_slot_state(c, s, state);
    s->lease_until = 0;
    s->deadline = 0;
    hr_slot_touch(c, s, i);
}

int hr_fail(void *mem, const hr_ticket *t, int64_t now, int retry, int64_t delay_us)
{
    LOCKED(c, mem);
    hr_slot *s = attempt_slot(&c, t);
    int rc = HR_E_STALE;
    uint32_t freed = 0;
    if (s) {
        uint32_t i = t->slot;
        hr_heap_unlink(&c, i);
        hr_slot_begin(&c, i);
        uint8_t st = next_state(s, now, retry, delay_us);
        HR_FAULT(HR_FS_FINISH);
        settle(&c, i, st);
        hr_slot_end(&c);
        freed = relink(&c, i);
        c.h->stats.finished++;
        rc = st;
    }
    hr_unlock(&c);
    if (rc >= 0)
        hr_notify(mem, rc == HR_PENDING ? HR_EV_PENDING : HR_EV_FINISH);
    if (rc != HR_PENDING)
        hr_notify_n(mem, HR_EV_PENDING, freed);
    return rc;
}

/* Fill the unset limits of n running attempts (one claim's tasks of one
 * name); out[k] is HR_OK or HR_E_STALE.  Returns how many were current. */
int hr_adopt(void *mem, const hr_ticket *t, uint32_t n, uint32_t max_attempts, uint32_t timeout_ms,
             uint8_t bo_kind, uint32_t bo_base_ms, uint32_t bo_cap_ms, int32_t *out)
{
    if ((bo_kind & ~HR_BO_JITTER) > HR_BO_EXPONENTIAL)
        return HR_E_INVALID;
    LOCKED(c, mem);
    int ok = 0;
    for (uint32_t k = 0; k < n; k++) {
        hr_slot *s = attempt_slot(&c, &t[k]);
        if (out)
            out[k] = s ? HR_OK : HR_E_STALE;
        if (!s)
            continue;
        hr_slot_begin(&c, t[k].slot);
        if (!s->max_attempts)
            s->max_attempts = max_attempts;
        HR_FAULT(HR_FS_HEARTBEAT); /* half-changed: the repair rolls it back */
        if (!s->bo_kind) {
            s->bo_kind = bo_kind;
            s->bo_base_ms = bo_base_ms;
            s->bo_cap_ms = bo_cap_ms;
        }
        if (!s->timeout_ms)
            s->timeout_ms = timeout_ms; /* its clock starts with hr_clock */
        hr_slot_end(&c);
        ok++;
    }
    hr_unlock(&c);
    return ok;
}

int hr_progress(void *mem, const hr_ticket *t, uint32_t ppm)
{
    if (ppm > 1000000)
        return HR_E_INVALID;
    LOCKED(c, mem);
    hr_slot *s = attempt_slot(&c, t);
    if (s)
        s->progress = ppm; /* one aligned word, not a durable change: no journal */
    hr_unlock(&c);
    return s ? HR_OK : HR_E_STALE;
}

int hr_expire(void *mem, int64_t now, uint32_t max, hr_ticket *out, uint8_t *states)
{
    LOCKED(c, mem);
    uint32_t k = 0, freed = 0;
    int pending = 0, finished = 0;
    while (k < max && c.h->lease_n > 0 && (int64_t)c.lease.a[0].key <= now) {
        uint32_t i = hr_bh_pop(&c.lease).slot;
        hr_slot *s = &c.s[i];
        hr_slot_begin(&c, i);
        /* Past its deadline the attempt failed (backoff applies); a lease
         * that merely ran out hands the task straight back. */
        int timed_out = s->deadline && now >= s->deadline;
        uint8_t st = next_state(s, now, 1, timed_out ? -1 : 0);
        HR_FAULT(HR_FS_EXPIRE);
        settle(&c, i, st);
        hr_slot_end(&c);
        freed += relink(&c, i);
        finished |= HR_TERMINAL(st);
        pending |= st == HR_PENDING;
        if (out)
            out[k] = (hr_ticket){s->id, i, s->attempt};
        if (states)
            states[k] = (uint8_t)(st | (timed_out ? 0x80 : 0));
        k++;
    }
    c.h->stats.expired += k;
    hr_unlock(&c);
    if (pending)
        hr_notify(mem, HR_EV_PENDING);
    else
        hr_notify_n(mem, HR_EV_PENDING, freed);
    if (finished)
        hr_notify(mem, HR_EV_FINISH);
    return (int)k;
}

int hr_promote(void *mem, int64_t now, uint32_t max)
{
    LOCKED(c, mem);
    uint32_t k = 0;
    while (k < max && c.h->delay_n > 0 && (int64_t)c.delay.a[0].key <= now) {
        uint32_t i = hr_bh_pop(&c.delay).slot;
        hr_slot *s = &c.s[i];
        hr_slot_begin(&c, i);
        HR_FAULT(HR_FS_PROMOTE);
        hr_slot_state(&c, s, HR_PENDING);
        hr_slot_end(&c);
        hr_heap_link(&c, i);
        k++;
    }
    hr_unlock(&c);
    hr_notify_n(mem, HR_EV_PENDING, k);
    return (int)k;
}

static int peek_at(void *mem, int worst, hr_slot *out)
{
    LOCKED(c, mem);
    int rc = HR_E_NOT_FOUND;
    if (c.h->ready_n > 0) {
        uint32_t i = c.ready.a[worst ? hr_mm_max_pos(&c.ready) : 0].slot;
        *out = c.s[i];
        rc = (int)i;
    }
    hr_unlock(&c);
    return rc;
}

int hr_peek_best(void *mem, hr_slot *out) { return peek_at(mem, 0, out); }
int hr_peek_worst(void *mem, hr_slot *out) { return peek_at(mem, 1, out); }

/* Drop pending slot i (already out of the ready heap and parked list). */
static void evict_slot(hr_ctx *c, uint32_t i, hr_slot *out)
{
    hr_slot *s = &c->s[i];
    *out = *s;
    if (s->flags & HR_F_DEDUP)
        hr_hs_erase(&c->dedup, s->dedup_lo, s->dedup_hi);
    hr_hs_erase(&c->ids, s->id, 0);
    HR_FAULT(HR_FS_EVICT);
    hr_slot_release(c, i);
    c->h->stats.evicted++;
}

/* Remove the worst pending task so that a better one can take its slot;
 * the caller keeps it on disk (the spill store).  A slot with an unflushed
 * change is refused: its change must reach disk first. */
int hr_evict_worst(void *mem, hr_slot *out)
{
    LOCKED(c, mem);
    int rc = HR_E_NOT_FOUND;
    uint32_t freed = 0;
    if (c.h->ready_n > 0) {
        uint32_t pos = hr_mm_max_pos(&c.ready);
        uint32_t i = c.ready.a[pos].slot;
        if (c.s[i].dirty) {
            rc = HR_E_BUSY;
        } else {
            uint32_t group = c.s[i].group;
            hr_mm_remove(&c.ready, pos);
            evict_slot(&c, i, out);
            freed = hr_group_freed(&c, group); /* it may have been its group's only unparked task */
            rc = (int)i;
        }
    }
    hr_unlock(&c);
    hr_notify_n(mem, HR_EV_PENDING, freed);
    return rc;
}

/* Remove the worst parked task of `group` (its share of the segment shrank
 * below what it holds); the caller keeps it on disk. */
int hr_evict_parked(void *mem, uint32_t group, hr_slot *out)
{
    if (group == 0 || group >= HR_MAX_GROUPS)
        return HR_E_INVALID;
    LOCKED(c, mem);
    int rc = HR_E_NOT_FOUND;
    uint32_t i = c.g[group].tail;
    if (i != HR_NONE) {
        if (c.s[i].dirty) {
            rc = HR_E_BUSY;
        } else {
            hr_unpark(&c, i);
            evict_slot(&c, i, out);
            rc = (int)i;
        }
    }
    hr_unlock(&c);
    return rc;
}

int hr_mark_dirty(void *mem, uint32_t slot)
{
    LOCKED(c, mem);
    int rc = HR_E_INVALID;
    if (slot < c.h->capacity && c.s[slot].state != HR_FREE) {
        hr_slot_begin(&c, slot);
        HR_FAULT(HR_FS_MARK_DIRTY);
        hr_slot_touch(&c, &c.s[slot], slot);
        hr_slot_end(&c);
        rc = HR_OK;
    }
    hr_unlock(&c);
    return rc;
}

int hr_dirty_peek(void *mem, uint32_t max, hr_dirty *out, uint32_t *epoch)
{
    LOCKED(c, mem);
    uint32_t n = c.h->ring_len < max ? c.h->ring_len : max;
    for (uint32_t k = 0; k < n; k++) {
        hr_rent *e = hr_ring_at(&c.ring, k);
        e->seen = c.s[e->slot].version;
        out[k].slot = e->slot;
        out[k].rec = c.s[e->slot];
    }
    *epoch = c.h->ring_epoch;
    hr_unlock(&c);
    return (int)n;
}

/* After the caller committed the first n peeked entries: slots unchanged
 * since the peek become clean (and free, if terminal); changed ones go back
 * to the tail. */
int hr_dirty_advance(void *mem, uint32_t n, uint32_t epoch, uint64_t flush_seq)
{
    LOCKED(c, mem);
    int rc = 0;
    /* In the same hold as the frees: a reader of the counts and the sequence
     * sees both from before this flush or both from after it. */
    if (flush_seq)
        c.h->stats.flush_seq = flush_seq;
    if (epoch != c.h->ring_epoch) {
        rc = HR_E_STALE;
    } else if (n > c.h->ring_len) {
        rc = HR_E_INVALID;
    } else {
        for (uint32_t k = 0; k < n; k++) {
            hr_rent e = hr_ring_pop(&c.ring);
            hr_slot *s = &c.s[e.slot];
            if (s->version != e.seen) {
                hr_ring_push(&c.ring, e.slot);
                continue;
            }
            hr_slot_begin(&c, e.slot);
            s->dirty = 0;
            HR_FAULT(HR_FS_ADVANCE);
            hr_slot_end(&c);
            if (HR_TERMINAL(s->state)) {
                hr_hs_erase(&c.ids, s->id, 0);
                hr_slot_release(&c, e.slot);
                rc++;
            }
        }
    }
    hr_unlock(&c);
    return rc;
}

int hr_dedup_lookup(void *mem, uint64_t lo, uint64_t hi)
{
    LOCKED(c, mem);
    int64_t b = hr_hs_find(&c.dedup, lo, hi);
    int rc = b < 0 ? HR_E_NOT_FOUND : (int)(c.dedup.t[b].slot1 - 1);
    hr_unlock(&c);
    return rc;
}

/* Register (lo, hi) for a live slot that has no key yet. */
int hr_dedup_insert(void *mem, uint64_t lo, uint64_t hi, uint32_t slot)
{
    LOCKED(c, mem);
    int rc;
    hr_slot *s = slot < c.h->capacity ? &c.s[slot] : NULL;
    if (!s || s->state == HR_FREE || HR_TERMINAL(s->state) || (s->flags & HR_F_DEDUP)) {
        rc = HR_E_INVALID;
    } else if (hr_hs_find(&c.dedup, lo, hi) >= 0) {
        rc = HR_E_DUPLICATE;
    } else {
        hr_slot_begin(&c, slot);
        s->dedup_lo = lo;
        s->dedup_hi = hi;
        HR_FAULT(HR_FS_DEDUP_INSERT);
        s->flags |= HR_F_DEDUP;
        hr_slot_end(&c);
        hr_hs_insert(&c.dedup, lo, hi, slot);
        rc = HR_OK;
    }
    hr_unlock(&c);
    return rc;
}

int hr_dedup_delete(void *mem, uint64_t lo, uint64_t hi)
{
    LOCKED(c, mem);
    int64_t b = hr_hs_find(&c.dedup, lo, hi);
    int rc = HR_E_NOT_FOUND;
    if (b >= 0) {
        uint32_t i = c.dedup.t[b].slot1 - 1;
        hr_slot_begin(&c, i);
        HR_FAULT(HR_FS_DEDUP_DELETE);
        c.s[i].flags &= (uint8_t)~HR_F_DEDUP;
        hr_slot_end(&c);
        hr_hs_erase(&c.dedup, lo, hi);
        rc = HR_OK;
    }
    hr_unlock(&c);
    return rc;
}

int hr_set_group_limit(void *mem, uint32_t group, uint32_t limit)
{
    if (group == 0 || group >= HR_MAX_GROUPS)
        return HR_E_INVALID;
    LOCKED(c, mem);
    c.g[group].limit = limit;
    HR_FAULT(HR_FS_GROUP); /* limits are not journaled: the repair keeps them and re-parks as claims need */
    hr_group_freed(&c, group); /* a higher limit lets parked tasks go */
    hr_unlock(&c);
    hr_notify(mem, HR_EV_PENDING);
    return HR_OK;
}

int hr_group_info(void *mem, uint32_t group, hr_group *out)
{
    if (group == 0 || group >= HR_MAX_GROUPS)
        return HR_E_INVALID;
    LOCKED(c, mem);
    *out = c.g[group];
    hr_unlock(&c);
    return HR_OK;
}

int hr_running(void *mem, uint32_t max, hr_dirty *out)
{
    LOCKED(c, mem);
    uint32_t n = c.h->lease_n < max ? c.h->lease_n : max;
    for (uint32_t k = 0; k < n; k++) { /* the lease heap holds exactly the running slots */
        uint32_t i = c.lease.a[k].slot;
        out[k].slot = i;
        out[k].rec = c.s[i];
    }
    hr_unlock(&c);
    return (int)n;
}

int hr_set_flush_seq(void *mem, uint64_t seq)
{
    LOCKED(c, mem);
    c.h->stats.flush_seq = seq;
    hr_unlock(&c);
    return HR_OK;
}
