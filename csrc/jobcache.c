/* The job cache (see jobcache.h). */
#include <string.h>
#include "headrace.h"

static inline uint64_t pad8(uint64_t x) { return (x + 7) & ~(uint64_t)7; }

/* Whether the writer, its head at `head`, has come round onto the record at `pos`. */
static inline int overwritten(uint64_t head, uint64_t pos, uint64_t cap) { return head > pos + cap; }

uint64_t hr_jc_put(void *mem, uint64_t id, const char *name, uint32_t name_len, const char *body,
                   uint32_t body_len, uint8_t ser, int64_t created, int32_t max_attempts, uint32_t timeout_ms)
{
    hr_header *h = (hr_header *)mem;
    uint64_t cap = h->jc_cap;
    uint64_t len = sizeof(hr_jc_rec) + (uint64_t)name_len + body_len;
    /* A record bigger than an eighth of the arena would push out many others. */
    if (!cap || len > cap / 8 || name_len > UINT16_MAX)
        return 0;
    uint64_t pos = __atomic_load_n(&h->jc_head, __ATOMIC_RELAXED);
    uint64_t at = pos % cap;
    if (at + len > cap) /* records never wrap: skip to the start */
        pos += cap - at, at = 0;
    /* The new head is published before any byte is written, so that a
     * reader of an older record there sees it as overwritten. */
    __atomic_store_n(&h->jc_head, pos + pad8(len), __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    char *p = (char *)mem + h->off_jc + at;
    hr_jc_rec r = {.id = id, .pos = pos, .created = created, .len = (uint32_t)len, .body_len = body_len,
                   .max_attempts = max_attempts, .timeout_ms = timeout_ms, .name_len = (uint16_t)name_len,
                   .ser = ser};
    memcpy(p, &r, sizeof r);
    memcpy(p + sizeof r, name, name_len);
    memcpy(p + sizeof r + name_len, body, body_len);
    /* The slot that points here is set under the segment's lock, after this. */
    return pos + 1;
}

int64_t hr_jc_read(void *mem, const hr_ticket *t, uint32_t n, char *out, uint64_t cap, int64_t *at)
{
    hr_header *h = (hr_header *)mem;
    const hr_slot *slots = (const hr_slot *)((char *)mem + h->off_slots);
    const char *arena = (const char *)mem + h->off_jc;
    uint64_t jc = h->jc_cap, used = 0;
    for (uint32_t k = 0; k < n; k++) {
        at[k] = -1;
        if (!jc || t[k].slot >= h->capacity)
            continue;
        uint64_t ref = __atomic_load_n(&slots[t[k].slot].aux, __ATOMIC_ACQUIRE);
        uint64_t head = __atomic_load_n(&h->jc_head, __ATOMIC_ACQUIRE);
        uint64_t pos = ref - 1, off = pos % jc;
        if (!ref || pos + sizeof(hr_jc_rec) > head || overwritten(head, pos, jc))
            continue;
        if (off + sizeof(hr_jc_rec) > jc || used + sizeof(hr_jc_rec) > cap)
            continue;
        hr_jc_rec r;
        memcpy(&r, arena + off, sizeof r);
        if (r.id != t[k].id || r.pos != pos || r.len < sizeof r || off + r.len > jc || used + r.len > cap ||
            r.len != sizeof r + (uint64_t)r.name_len + r.body_len)
            continue;
        memcpy(out + used, arena + off, r.len);
        /* Intact only if the writer has not come round onto it since. */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (overwritten(__atomic_load_n(&h->jc_head, __ATOMIC_RELAXED), pos, jc))
            continue;
        at[k] = (int64_t)used;
        used += pad8(r.len);
    }
    return (int64_t)used;
}
