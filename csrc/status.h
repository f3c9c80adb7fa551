/* The one status enum every C entry point returns through.
 *
 * Functions that produce a count or an index return it as a non-negative
 * int; every failure is one of the negative codes below.  Python maps these
 * to exceptions in exactly one place (engine/errors.py).
 */
#ifndef HR_STATUS_H
#define HR_STATUS_H

enum hr_status {
    HR_OK = 0,
    HR_E_FULL = -1,          /* no free slot: the live set is at capacity */
    HR_E_DUPLICATE = -2,     /* a live task already holds this key */
    HR_E_NOT_FOUND = -3,     /* no such slot / key / task */
    HR_E_STALE = -4,         /* fenced: the attempt or the ring epoch moved on */
    HR_E_BAD_MAGIC = -5,     /* not a headrace segment */
    HR_E_BAD_VERSION = -6,   /* a headrace segment of another layout version */
    HR_E_TRUNCATED = -7,     /* mapping smaller than the layout needs */
    HR_E_CORRUPT = -8,       /* header checksum or invariants do not hold */
    HR_E_FOREIGN_OWNER = -9, /* created by another uid */
    HR_E_NOT_READY = -10,    /* creator has not finished initialising */
    HR_E_INVALID = -11,      /* a bad argument */
    HR_E_LOCK = -12,         /* the mutex is unrecoverable */
    HR_E_TIMEOUT = -13,      /* a wait timed out */
    HR_E_STATE = -14,        /* the task is not in a state that allows this */
    HR_E_BUSY = -15,         /* the slot has an unflushed change; flush first */
    HR_E_INTERRUPTED = -16,  /* a wait was cut short by a signal: the caller looks again */
};

#endif
