/* Packing a part of a plain request from one JSON array (see plain.h). */
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
        uint64_t id = first_id + k;
        int64_t run_at = 0;
        uint16_t nlen = (uint16_t)name_len;
        uint32_t blen = (uint32_t)(e - p);
        put(&q, &id, 8);
        put(&q, &run_at, 8);
        put(&q, &created, 8);
        put(&q, &backoff, 8);
        put(&q, &timeout_ms, 8);
        put(&q, &max_attempts, 4);
        put(&q, &nlen, 2);
        put(&q, &prios[k], 1);
        put(&q, &ser, 1);
        put(&q, &blen, 4);
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
