#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include "headrace.h"

#define HDR ((uint64_t)sizeof(hr_req))

static inline hr_req *rec_at(const hr_header *h, uint64_t pos)
{
    return (hr_req *)((char *)h + h->off_req + (pos & (h->req_cap - 1)));
}

/* A record length that can be walked: whole 32-byte units, not crossing
 * the end of the area. */
static inline int len_ok(const hr_header *h, uint64_t pos, uint32_t len)
{
    return len != 0 && len % HDR == 0 && (pos & (h->req_cap - 1)) + len <= h->req_cap;
}

static inline int settable(uint32_t st)
{
    return st >= HR_REQ_RESERVED && st <= HR_REQ_ABANDONED && st != HR_REQ_PAD;
}

/* The record that starts at pos.  At or past the tail: HR_E_NOT_FOUND;
 * before the head, misaligned or inside a record: HR_E_INVALID. */
static int locate(hr_header *h, uint64_t pos, hr_req **out)
{
    uint64_t tail = __atomic_load_n(&h->req_tail, __ATOMIC_ACQUIRE);
    if (pos >= tail)
        return HR_E_NOT_FOUND;
    uint64_t head = __atomic_load_n(&h->req_head, __ATOMIC_ACQUIRE);
    if (pos < head || pos % HDR)
        return HR_E_INVALID;
    hr_req *r = rec_at(h, pos);
    if (r->pos != pos)
        return HR_E_INVALID;
    if (!len_ok(h, pos, r->len))
        return HR_E_CORRUPT;
    *out = r;
    return HR_OK;
}

/* A caller-visible (non-pad) record in [head, tail), else HR_E_INVALID. */
static int locate_rec(hr_header *h, uint64_t pos, hr_req **out)
{
    int rc = locate(h, pos, out);
    if (rc == HR_E_NOT_FOUND || (rc == HR_OK && __atomic_load_n(&(*out)->state, __ATOMIC_RELAXED) == HR_REQ_PAD))
        return HR_E_INVALID;
    return rc;
}

static inline void read_rec(const hr_req *r, hr_req *out)
{
    /* The state first: its release store published nbytes and the data. */
    out->state = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
    out->len = r->len;
    out->pid = r->pid;
    out->nbytes = __atomic_load_n(&r->nbytes, __ATOMIC_RELAXED);
    out->pos = r->pos;
    /* Acquire: a streaming producer's release store of it published the data. */
    out->tag = __atomic_load_n(&r->tag, __ATOMIC_ACQUIRE);
}

int hr_req_reserve(void *mem, uint32_t nbytes, uint32_t pid, uint64_t *pos)
{
    hr_header *h = (hr_header *)mem;
    uint64_t cap = h->req_cap;
    uint64_t need = ((uint64_t)nbytes + HDR + HDR - 1) & ~(HDR - 1);
    if (need > cap / 2)
        return HR_E_INVALID; /* any larger and an empty area could not always hold it */
    LOCKED(c, mem);
    uint64_t tail = h->req_tail;
    uint64_t head = __atomic_load_n(&h->req_head, __ATOMIC_ACQUIRE);
    uint64_t off = tail & (cap - 1);
    uint64_t pad = off + need > cap ? cap - off : 0;
    if (tail + pad + need - head > cap) {
        hr_unlock(&c);
        return HR_E_FULL;
    }
    if (pad)
        *rec_at(h, tail) = (hr_req){(uint32_t)pad, HR_REQ_PAD, pid, 0, tail, 0};
    uint64_t p = tail + pad;
    *rec_at(h, p) = (hr_req){(uint32_t)need, HR_REQ_RESERVED, pid, nbytes, p, 0};
    HR_FAULT(HR_FS_REQ_RESERVE);
    /* Publish last: a holder killed before this store leaves no record, one
     * killed after it leaves complete headers. */
    __atomic_store_n(&h->req_tail, p + need, __ATOMIC_RELEASE);
    hr_unlock(&c);
    *pos = p;
    return HR_OK;
}

/* Returns the record's data capacity (len - 32) and its data offset in *off. */
int hr_req_data(void *mem, uint64_t pos, uint64_t *off)
{
    hr_header *h = (hr_header *)mem;
    hr_req *r;
    int rc = locate_rec(h, pos, &r);
    if (rc != HR_OK)
        return rc;
    *off = h->off_req + (pos & (h->req_cap - 1)) + HDR;
    return (int)(r->len - HDR);
}

/* The record at `pos`, if `state` is one a caller may store there. */
static int state_target(void *mem, uint64_t pos, uint32_t state, hr_req **out)
{
    return settable(state) ? locate_rec((hr_header *)mem, pos, out) : HR_E_INVALID;
}

int hr_req_set_state(void *mem, uint64_t pos, uint32_t state)
{
    hr_req *r;
    int rc = state_target(mem, pos, state, &r);
    if (rc != HR_OK)
        return rc;
    __atomic_store_n(&r->state, state, __ATOMIC_RELEASE);
    return HR_OK;
}

/* Like set_state, but only from `expect`; HR_E_STATE if the record moved on
 * (an answer must not overwrite a producer's ABANDONED). */
int hr_req_cas_state(void *mem, uint64_t pos, uint32_t expect, uint32_t state)
{
    hr_req *r;
    int rc = state_target(mem, pos, state, &r);
    if (rc != HR_OK)
        return rc;
    if (!__atomic_compare_exchange_n(&r->state, &expect, state, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return HR_E_STATE;
    return HR_OK;
}

/* The record at `pos`, if `nbytes` of data fit in it. */
static int sized_rec(void *mem, uint64_t pos, uint32_t nbytes, hr_req **out)
{
    int rc = locate_rec((hr_header *)mem, pos, out);
    if (rc == HR_OK && nbytes > (*out)->len - HDR)
        return HR_E_INVALID;
    return rc;
}

/* No ordering of its own: the state store that follows publishes it. */
int hr_req_set_nbytes(void *mem, uint64_t pos, uint32_t nbytes)
{
    hr_req *r;
    int rc = sized_rec(mem, pos, nbytes, &r);
    if (rc != HR_OK)
        return rc;
    __atomic_store_n(&r->nbytes, nbytes, __ATOMIC_RELAXED);
    return HR_OK;
}

int hr_req_stream(void *mem, uint64_t pos, uint32_t nbytes)
{
    hr_req *r;
    int rc = sized_rec(mem, pos, nbytes, &r);
    if (rc != HR_OK)
        return rc;
    if (__atomic_load_n(&r->state, __ATOMIC_RELAXED) != HR_REQ_RESERVED)
        return HR_E_STATE;
    __atomic_store_n(&r->tag, (uint64_t)nbytes, __ATOMIC_RELEASE);
    return HR_OK;
}

/* The writer's answer in one call: copy it in place of the request, size
 * it, and move the record READY -> ANSWERED (the state's release store
 * publishes the bytes).  HR_E_STATE if the record is no longer READY (its
 * producer abandoned it); nobody reads those bytes then. */
int hr_req_answer(void *mem, uint64_t pos, const char *data, uint32_t nbytes)
{
    hr_req *r;
    int rc = sized_rec(mem, pos, nbytes, &r);
    if (rc != HR_OK)
        return rc;
    memcpy((char *)r + HDR, data, nbytes);
    __atomic_store_n(&r->nbytes, nbytes, __ATOMIC_RELAXED);
    uint32_t expect = HR_REQ_READY;
    if (!__atomic_compare_exchange_n(&r->state, &expect, HR_REQ_ANSWERED, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return HR_E_STATE;
    return HR_OK;
}

/* A whole request in one call: reserve `room` bytes (at least `nbytes`),
 * copy the data in, publish it READY and wake the writer.  HR_E_FULL while
 * the area has no room (the writer is nudged to reclaim). */
int hr_req_send(void *mem, const char *data, uint32_t nbytes, uint32_t room, uint32_t pid, uint64_t *pos)
{
    if (room < nbytes)
        room = nbytes;
    int rc = hr_req_reserve(mem, room, pid, pos);
    if (rc == HR_E_FULL)
        hr_notify(mem, HR_EV_WRITER);
    if (rc != HR_OK)
        return rc;
    hr_header *h = (hr_header *)mem;
    hr_req *r = rec_at(h, *pos);
    memcpy((char *)r + HDR, data, nbytes);
    __atomic_store_n(&r->nbytes, nbytes, __ATOMIC_RELAXED);
    __atomic_store_n(&r->state, HR_REQ_READY, __ATOMIC_RELEASE); /* publishes nbytes and the data */
    hr_notify(mem, HR_EV_WRITER);
    return HR_OK;
}

/* Wait up to timeout_us for the answer to the record at `pos`: HR_OK with
 * its size in *nbytes once ANSWERED, HR_E_TIMEOUT, or HR_E_STATE if it is
 * neither READY nor ANSWERED (its producer, or the writer, abandoned it). */
int hr_req_await(void *mem, uint64_t pos, int64_t timeout_us, uint32_t *nbytes)
{
    hr_req *r;
    int rc = locate_rec((hr_header *)mem, pos, &r);
    if (rc != HR_OK)
        return rc;
    int64_t deadline = hr_mono_us() + (timeout_us < 0 ? 0 : timeout_us);
    for (;;) {
        uint32_t seen = hr_event_value(mem, HR_EV_COMMIT); /* before the look: no wake-up is missed */
        uint32_t st = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
        if (st == HR_REQ_ANSWERED) {
            *nbytes = __atomic_load_n(&r->nbytes, __ATOMIC_RELAXED);
            return HR_OK;
        }
        if (st != HR_REQ_READY)
            return HR_E_STATE;
        int64_t left = deadline - hr_mono_us();
        if (left <= 0)
            return HR_E_TIMEOUT;
        if (hr_wait(mem, HR_EV_COMMIT, seen, left) == HR_E_INTERRUPTED)
            return HR_E_INTERRUPTED;
    }
}

int hr_req_get(void *mem, uint64_t pos, hr_req *out)
{
    hr_req *r;
    int rc = locate((hr_header *)mem, pos, &r);
    if (rc != HR_OK)
        return rc;
    read_rec(r, out);
    return HR_OK;
}

int hr_req_next(void *mem, uint64_t pos, hr_req *out)
{
    for (;;) {
        hr_req *r;
        int rc = locate((hr_header *)mem, pos, &r);
        if (rc != HR_OK)
            return rc;
        read_rec(r, out);
        if (out->state != HR_REQ_PAD)
            return HR_OK;
        pos += out->len;
    }
}

/* Consumer only: no lock, since nobody else writes the head. */
int64_t hr_req_reclaim(void *mem, uint64_t upto)
{
    hr_header *h = (hr_header *)mem;
    uint64_t head = __atomic_load_n(&h->req_head, __ATOMIC_RELAXED);
    uint64_t tail = __atomic_load_n(&h->req_tail, __ATOMIC_ACQUIRE);
    uint64_t p = head;
    int rc = HR_OK;
    while (p < upto && p < tail) {
        hr_req *r = rec_at(h, p);
        uint32_t st = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
        if (st != HR_REQ_DONE && st != HR_REQ_PAD && st != HR_REQ_ABANDONED)
            break;
        if (r->pos != p || !len_ok(h, p, r->len) || r->len > tail - p) {
            rc = HR_E_CORRUPT;
            break;
        }
        p += r->len;
    }
    if (p != head) {
        /* Release: our reads of the records happen before a producer's
         * reuse of their bytes. */
        __atomic_store_n(&h->req_head, p, __ATOMIC_RELEASE);
        hr_notify(mem, HR_EV_COMMIT);
    }
    return rc != HR_OK ? rc : (int64_t)p;
}

/* Consumer only: mark ABANDONED each ANSWERED record before `upto` whose
 * producer is gone (it died before reading its answer), walking from the
 * head while records are finished; then reclaim up to `upto`.  Returns
 * the new head, like hr_req_reclaim. */
int64_t hr_req_sweep(void *mem, uint64_t upto)
{
    hr_header *h = (hr_header *)mem;
    uint64_t p = __atomic_load_n(&h->req_head, __ATOMIC_RELAXED);
    uint64_t tail = __atomic_load_n(&h->req_tail, __ATOMIC_ACQUIRE);
    while (p < upto && p < tail) {
        hr_req *r = rec_at(h, p);
        if (r->pos != p || !len_ok(h, p, r->len) || r->len > tail - p)
            return HR_E_CORRUPT;
        uint32_t st = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
        if (st == HR_REQ_ANSWERED && kill((pid_t)r->pid, 0) != 0 && errno == ESRCH)
            __atomic_compare_exchange_n(&r->state, &st, HR_REQ_ABANDONED, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
        else if (st != HR_REQ_DONE && st != HR_REQ_PAD && st != HR_REQ_ABANDONED)
            break;
        p += r->len;
    }
    return hr_req_reclaim(mem, upto);
}

int hr_req_bounds(void *mem, uint64_t *head, uint64_t *tail)
{
    hr_header *h = (hr_header *)mem;
    /* Head first: it never passes the tail, so the pair is ordered. */
    *head = __atomic_load_n(&h->req_head, __ATOMIC_ACQUIRE);
    *tail = __atomic_load_n(&h->req_tail, __ATOMIC_ACQUIRE);
    return HR_OK;
}

int hr_reserve_ids(void *mem, uint32_t n, uint64_t *first)
{
    LOCKED(c, mem);
    *first = c.h->next_id;
    c.h->next_id += n;
    hr_unlock(&c);
    return HR_OK;
}

int hr_raise_next_id(void *mem, uint64_t v)
{
    LOCKED(c, mem);
    if (c.h->next_id < v)
        c.h->next_id = v;
    hr_unlock(&c);
    return HR_OK;
}

#define FAIL(...) do { snprintf(msg, msglen, __VA_ARGS__); return HR_E_CORRUPT; } while (0)

int hr_req_verify(const hr_header *h, char *msg, uint32_t msglen)
{
    /* Records in [head, tail) cannot change shape while we hold the lock;
     * the consumer may only move the head forward past them. */
    uint64_t head = __atomic_load_n(&h->req_head, __ATOMIC_ACQUIRE);
    uint64_t tail = h->req_tail;
    uint64_t cap = h->req_cap;
    if (head > tail || tail - head > cap || (head | tail) % HDR)
        FAIL("request head %llu and tail %llu are out of order", (unsigned long long)head,
             (unsigned long long)tail);
    for (uint64_t p = head; p < tail;) {
        const hr_req *r = rec_at(h, p);
        uint32_t len = r->len;
        if (!len_ok(h, p, len) || len > tail - p)
            FAIL("request record at %llu has length %u", (unsigned long long)p, len);
        if (r->pos != p)
            FAIL("request record at %llu says it is at %llu", (unsigned long long)p,
                 (unsigned long long)r->pos);
        uint32_t st = __atomic_load_n(&r->state, __ATOMIC_ACQUIRE);
        if (st < HR_REQ_RESERVED || st > HR_REQ_ABANDONED)
            FAIL("request record at %llu has state %u", (unsigned long long)p, st);
        if (st == HR_REQ_PAD && (p & (cap - 1)) + len != cap)
            FAIL("pad record at %llu stops short of the end of the area", (unsigned long long)p);
        uint32_t nb = __atomic_load_n(&r->nbytes, __ATOMIC_RELAXED);
        if (nb > len - HDR)
            FAIL("request record at %llu holds %u bytes in %u", (unsigned long long)p, nb, len);
        p += len;
    }
    return HR_OK;
}
