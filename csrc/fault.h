/* Fault injection for crash tests.
 *
 * Each locked operation has one site in the middle of its work, after a
 * slot has been journaled and partly rewritten but before the derived
 * structures agree with it.  Tests arm a site; the process then kills itself
 * with SIGKILL on the chosen hit, so the robust-mutex repair runs in the
 * next locker.  Disarmed, a site costs one predictable branch.
 */
#ifndef HR_FAULT_H
#define HR_FAULT_H

#include <stdint.h>

enum hr_fault_site {
    HR_FS_INSERT = 0,
    HR_FS_CLAIM,
    HR_FS_FINISH,
    HR_FS_CANCEL,
    HR_FS_HEARTBEAT,
    HR_FS_EXPIRE,
    HR_FS_PROMOTE,
    HR_FS_EVICT,
    HR_FS_MARK_DIRTY,
    HR_FS_ADVANCE,
    HR_FS_DEDUP_INSERT,
    HR_FS_DEDUP_DELETE,
    HR_FS_REQ_RESERVE,  /* request header written, tail not yet advanced */
    HR_FS_GROUP,
    HR_FS_REPAIR,
    HR_FS_TURN_COMMIT,    /* the C turn: its rows inserted, before COMMIT (no lock held) */
    HR_FS_TURN_COMMITTED, /* ... after COMMIT, before the segment shows them */
    HR_NFAULTS,
};

extern int hr_fault_mode; /* 0 off, 1 count hits, 2 count and kill */

void hr_fault_arm(int site, uint32_t on_hit);
void hr_fault_count(int on);
uint64_t hr_fault_hits(int site);
void hr_fault_hit(int site);

#define HR_FAULT(site) do { if (__builtin_expect(hr_fault_mode != 0, 0)) hr_fault_hit(site); } while (0)

#endif
