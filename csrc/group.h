/* Groups with concurrency limits.
 *
 * A group's running count is derived from its RUNNING slots.  While a group
 * runs at its limit, its pending tasks wait in a parked list (sorted by
 * rank, intrusive through a per-slot link array) instead of the ready heap,
 * so a saturated group never stalls the claims of other groups: a claim
 * that pops a task of a full group parks it and pops the next.  Each time a
 * running task of the group ends, the best parked task goes back to the
 * ready heap.
 *
 * Parking is an optimisation the repair may undo: after a lock holder died,
 * every pending task goes back to the ready heap and claims park again as
 * needed.  So the parked flag needs no journal.
 */
#ifndef HR_GROUP_H
#define HR_GROUP_H

#include "layout.h"

struct hr_ctx;

/* Whether a task of group g may not start now. */
static inline int hr_group_full(const hr_group *g)
{
    return g->limit && g->running >= g->limit;
}

void hr_park(struct hr_ctx *c, uint32_t i);
void hr_unpark(struct hr_ctx *c, uint32_t i);
/* Unpark what a freed place (or a higher limit) lets go; returns how
 * many tasks it made claimable, for the caller to wake claimers for
 * after the lock (hr_notify_n on HR_EV_PENDING). */
uint32_t hr_group_freed(struct hr_ctx *c, uint32_t g);
void hr_groups_reset(struct hr_ctx *c);
int hr_groups_check(struct hr_ctx *c, char *msg, uint32_t msglen);

#endif
