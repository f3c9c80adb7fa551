/* The job cache: what a worker needs to run a job (its name, serializer,
 * creation time, stored limits and payload), kept in the segment by the
 * writer as it places the job, so that a claim need not read SQLite.
 *
 * It is a byte arena that only the writer process writes, as a log that
 * wraps: each record goes at the next position (a monotonic byte count),
 * and old records are simply overwritten.  The slot's `aux` holds its job's
 * record position + 1 (0: none).  A reader copies the record out and then
 * checks that the writer has not come round onto it meanwhile; a record
 * that is gone, overwritten or another task's is a miss, and the worker
 * reads that job from SQLite as before.  Nothing here is ever needed for
 * correctness: SQLite holds every job, and a rebuilt segment starts empty.
 */
#ifndef HR_JOBCACHE_H
#define HR_JOBCACHE_H

#include <stdint.h>
#include "layout.h"

/* Arena bytes per slot of capacity. */
#define HR_JC_PER_SLOT 256u

/* A record's header; the name and then the body follow it, and the record
 * is padded to a multiple of 8 bytes. */
typedef struct hr_jc_rec {
    uint64_t id;
    uint64_t pos;        /* its own position: a record found elsewhere is not it */
    int64_t created;
    uint32_t len;        /* header + name + body, unpadded */
    uint32_t body_len;
    int32_t max_attempts;/* as stored: 0 = unset */
    uint32_t timeout_ms; /* as stored */
    uint16_t name_len;
    uint8_t ser;
    uint8_t _pad[5];
} hr_jc_rec;

/* The writer: append a record for job `id`; its position + 1 for the slot's
 * aux, or 0 if the job is too big to cache (or the segment has no cache). */
uint64_t hr_jc_put(void *mem, uint64_t id, const char *name, uint32_t name_len, const char *body,
                   uint32_t body_len, uint8_t ser, int64_t created, int32_t max_attempts, uint32_t timeout_ms);
/* A worker: copy the records of the claimed tickets t[0..n) into `out`
 * (`cap` bytes), one after another; at[k] is where ticket k's record
 * starts, or -1 for a miss.  Returns the bytes copied (0: no hit). */
int64_t hr_jc_read(void *mem, const hr_ticket *t, uint32_t n, char *out, uint64_t cap, int64_t *at);

#endif
