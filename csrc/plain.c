/* Packing a part of a plain request from one JSON array (see plain.h). */
#include <stdlib.h>
#include <string.h>
#include "headrace.h"

/* The end of the JSON value that starts at `p` (before `end`): the first
 * ',' or ']' outside strings and nested values, or NULL. */
static const char *value_end(const char *p, const char *end)
{
    uint32_t depth = 0;
    for (; p < end; p++) {
        char c = *p;
        if (c == '"') {
            for (p++; p < end && *p != '"'; p++)
                if (*p == '\\')
                    p++; /* an escaped character, maybe a quote */
            if (p >= end)
                return NULL;
        } else if (c == '[' || c == '{') {
            depth++;
        } else if (c == ']' || c == '}') {
            if (!depth)
                return c == ']' ? p : NULL;
            depth--;
        } else if (c == ',' && !depth) {
            return p;
        }
    }
    return NULL;
}

static inline void put(char **q, const void *v, size_t n)
{
    memcpy(*q, v, n);
    *q += n;
}

/* The 52-byte head of one job (see plain.h). */
static void put_item(char **q, uint64_t id, int64_t run_at, int64_t created, int64_t backoff, int64_t timeout_ms,
                     int32_t max_attempts, uint16_t name_len, uint8_t prio, uint8_t ser, uint32_t body_len)
{
    put(q, &id, 8);
    put(q, &run_at, 8);
    put(q, &created, 8);
    put(q, &backoff, 8);
    put(q, &timeout_ms, 8);
    put(q, &max_attempts, 4);
    put(q, &name_len, 2);
    put(q, &prio, 1);
    put(q, &ser, 1);
    put(q, &body_len, 4);
}

int64_t hr_plain_pack(char *out, uint64_t cap, uint32_t mode, const char *name, uint32_t name_len, uint64_t first_id,
                      int64_t created, int64_t backoff, int64_t timeout_ms, int32_t max_attempts, uint8_t ser,
                      const uint8_t *prios, uint32_t n, const char *json, uint64_t json_len, uint32_t max_body)
{
    if (!n || !name_len || name_len > UINT16_MAX || json_len < 2 || json[0] != '[' || json[json_len - 1] != ']')
        return HR_E_INVALID;
    /* The elements' bytes are the array's but for its brackets and commas. */
    uint64_t need = HR_FRAME_HEAD + HR_PLAIN_HEAD + (uint64_t)n * (HR_PLAIN_ITEM + name_len) + json_len;
    if (need > cap)
        return HR_E_FULL;
    char *q = out + HR_FRAME_HEAD;
    uint32_t head[4] = {HR_PLAIN_MAGIC, mode, n, 0};
    put(&q, head, sizeof head);
    const char *p = json + 1, *end = json + json_len;
    for (uint32_t k = 0; k < n; k++) {
        const char *e = value_end(p, end);
        /* An element ends at a ',' unless it is the last, which ends the array. */
        if (!e || e == p || (*e == ']') != (k == n - 1) || (uint64_t)(e - p) > max_body)
            return HR_E_INVALID;
        uint32_t blen = (uint32_t)(e - p);
        put_item(&q, first_id + k, 0, created, backoff, timeout_ms, max_attempts, (uint16_t)name_len, prios[k], ser,
                 blen);
        put(&q, name, name_len);
        put(&q, p, blen);
        p = e + 1;
    }
    if (p != end)
        return HR_E_INVALID; /* more after the array's end */
    uint32_t len = (uint32_t)(q - out - HR_FRAME_HEAD);
    memcpy(out, &len, 4);
    return q - out;
}

int hr_plain_send(void *mem, uint32_t mode, const char *name, uint32_t name_len, const char *body, uint32_t body_len,
                  uint8_t prio, uint8_t ser, int64_t run_at, int64_t created, int32_t max_attempts, int64_t timeout_ms,
                  int64_t backoff, uint32_t pid, uint64_t *out)
{
    if (!name_len || name_len > UINT16_MAX)
        return HR_E_INVALID;
    uint64_t size = HR_PLAIN_HEAD + HR_PLAIN_ITEM + (uint64_t)name_len + body_len;
    if (size > UINT32_MAX / 2)
        return HR_E_INVALID;
    char small[4096];
    char *buf = size <= sizeof small ? small : malloc(size);
    if (!buf)
        return HR_E_FULL;
    uint64_t id;
    int rc = hr_reserve_ids(mem, 1, &id);
    if (rc == HR_OK) {
        char *q = buf;
        uint32_t head[4] = {HR_PLAIN_MAGIC, mode, 1, 0};
        put(&q, head, sizeof head);
        put_item(&q, id, run_at, created, backoff, timeout_ms, max_attempts, (uint16_t)name_len, prio, ser, body_len);
        put(&q, name, name_len);
        put(&q, body, body_len);
        rc = hr_req_send(mem, buf, (uint32_t)size, HR_ANSWER_ONE, pid, &out[0]);
        out[1] = id;
    }
    if (buf != small)
        free(buf);
    return rc;
}

int hr_plain_await(void *mem, uint64_t pos, int64_t timeout_us, int64_t *out)
{
    uint32_t n = 0;
    int rc = hr_req_await(mem, pos, timeout_us, &n);
    if (rc != HR_OK)
        return rc;
    uint64_t off;
    int room = hr_req_data(mem, pos, &off);
    if (room < 0)
        return room;
    const char *a = (const char *)mem + off;
    uint32_t count = 0;
    if (n == 4 + 17 && (uint32_t)room >= n)
        memcpy(&count, a, 4);
    if (count != 1)
        return HR_E_BUSY; /* not one job's answer (an error, say): the caller reads it */
    int64_t ids[2];
    memcpy(ids, a + 5, 16);
    out[0] = (uint8_t)a[4];
    out[1] = ids[0];
    out[2] = ids[1];
    return hr_req_set_state(mem, pos, HR_REQ_DONE);
}

int hr_plain_submit(void *mem, uint32_t mode, const char *name, uint32_t name_len, const char *body, uint32_t body_len,
                    uint8_t prio, uint8_t ser, int64_t run_at, int64_t created, int32_t max_attempts, int64_t timeout_ms,
                    int64_t backoff, uint32_t pid, int64_t timeout_us, int64_t *out)
{
    uint64_t sent[2];
    out[0] = 0;
    int rc = hr_plain_send(mem, mode, name, name_len, body, body_len, prio, ser, run_at, created, max_attempts,
                           timeout_ms, backoff, pid, sent);
    if (rc != HR_OK)
        return rc;
    out[1] = (int64_t)sent[0];
    out[2] = (int64_t)sent[1];
    __atomic_store_n(&out[0], 1, __ATOMIC_RELEASE); /* a caller interrupted as this returns reads it */
    return hr_plain_await(mem, sent[0], timeout_us, out + 3);
}
