/* headrace native core: the umbrella header. */
#ifndef HEADRACE_H
#define HEADRACE_H

#include "status.h"
#include "layout.h"
#include "fault.h"
#include "heap.h"
#include "hset.h"
#include "ring.h"
#include "segment.h"
#include "slots.h"
#include "group.h"
#include "wait.h"
#include "ops.h"
#include "reqring.h"
#include "plain.h"
#include "jobcache.h"
#include "turn.h"

#endif
