/* The locked operations: each takes the segment lock once and keeps every
 * structure consistent with the slot table before it lets go. */
#ifndef HR_OPS_H
#define HR_OPS_H

#include "layout.h"

int hr_reserve_seq(void *mem, uint32_t n, uint64_t *first);
int hr_insert_batch(void *mem, const hr_task *tasks, uint32_t n, int32_t *out);
int hr_claim(void *mem, uint32_t max, int64_t now, int64_t lease_until, int start, hr_ticket *out);
int hr_finish_batch(void *mem, const hr_ticket *t, uint32_t n, uint8_t state,
                    int64_t run_at, uint64_t aux, int32_t *out);
/* hr_finish_batch of one ticket given by its fields: the item's status
 * (HR_OK, or HR_E_STALE if fenced), or a failure of the call. */
int hr_finish_one(void *mem, uint64_t id, uint32_t slot, uint32_t attempt, uint8_t state, int64_t run_at, uint64_t aux);
int hr_heartbeat(void *mem, const hr_ticket *t, int64_t lease_until);
int hr_clock(void *mem, const hr_ticket *t, int64_t now, int64_t lease_until, int start);
int hr_cancel(void *mem, uint64_t id);
int hr_get(void *mem, uint64_t id, hr_slot *out);
int hr_read_slot(void *mem, uint32_t slot, hr_slot *out);
int hr_expire(void *mem, int64_t now, uint32_t max, hr_ticket *out, uint8_t *states);
int hr_fail(void *mem, const hr_ticket *t, int64_t now, int retry, int64_t delay_us);
int hr_progress(void *mem, const hr_ticket *t, uint32_t ppm);
int hr_set_group_limit(void *mem, uint32_t group, uint32_t limit);
int hr_group_info(void *mem, uint32_t group, hr_group *out);
int hr_running(void *mem, uint32_t max, hr_dirty *out);
int hr_set_flush_seq(void *mem, uint64_t seq);
int hr_adopt(void *mem, const hr_ticket *t, uint32_t n, uint32_t max_attempts, uint32_t timeout_ms,
             uint8_t bo_kind, uint32_t bo_base_ms, uint32_t bo_cap_ms, int32_t *out);
int64_t hr_backoff_us(uint8_t kind, uint32_t base_ms, uint32_t cap_ms, uint32_t attempt, uint64_t rnd);
int hr_promote(void *mem, int64_t now, uint32_t max);
int hr_peek_best(void *mem, hr_slot *out);
int hr_peek_worst(void *mem, hr_slot *out);
int hr_evict_worst(void *mem, hr_slot *out);
int hr_evict_parked(void *mem, uint32_t group, hr_slot *out);
int hr_mark_dirty(void *mem, uint32_t slot);
int hr_dirty_peek(void *mem, uint32_t max, hr_dirty *out, uint32_t *epoch);
int hr_dirty_advance(void *mem, uint32_t n, uint32_t epoch, uint64_t flush_seq);
int hr_dedup_lookup(void *mem, uint64_t lo, uint64_t hi);
int hr_dedup_insert(void *mem, uint64_t lo, uint64_t hi, uint32_t slot);
int hr_dedup_delete(void *mem, uint64_t lo, uint64_t hi);

#endif
