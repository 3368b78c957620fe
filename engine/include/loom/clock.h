/*
 * Time helpers: wall and monotonic clocks, durations in the Go-like form the
 * configuration uses ("250ms", "5s", "1h30m", "168h"), RFC 3339 formatting,
 * and capped exponential backoff with jitter.
 */
#ifndef LOOM_CLOCK_H
#define LOOM_CLOCK_H

#include <stdint.h>
#include <stddef.h>

/* Milliseconds since the Unix epoch. */
int64_t loom_now_ms(void);
/* Microseconds since the Unix epoch. */
int64_t loom_now_us(void);
/* Monotonic nanoseconds (for timing, never for timestamps). */
int64_t loom_mono_ns(void);
/* Monotonic milliseconds. */
int64_t loom_mono_ms(void);
/* Monotonic nanoseconds for measuring short durations on a hot path: on x86-64
 * with the kernel's clock source on the TSC, the CPU's time-stamp counter
 * scaled to nanoseconds (about a third of the cost of clock_gettime() here),
 * else loom_mono_ns(). Each thread anchors the counter to loom_mono_ns() at
 * least every 100 ms, so a value stays within microseconds of loom_mono_ns()
 * and may be compared with it; values read by one thread never go back. */
int64_t loom_mono_fast_ns(void);
/* The CLOCK_REALTIME time ms from now, for pthread_cond_timedwait(). */
struct timespec;
void loom_timespec_in(int64_t ms, struct timespec *ts);

/* Parses a duration such as "1h30m", "250ms", "10s", "0"; units ns us ms s m h d.
 * Returns 0 and the duration in milliseconds, or LOOM_EINVAL (also on overflow
 * or a sub-millisecond remainder). */
int loom_duration_parse_ms(const char *s, int64_t *out_ms);
/* Formats milliseconds as a duration string ("1h30m", "250ms", "0s"). */
void loom_duration_format(int64_t ms, char *buf, size_t size);

/* Formats Unix microseconds as RFC 3339 UTC with microseconds ("...Z"). */
void loom_rfc3339_format(int64_t unix_us, char *buf, size_t size);

/* Formats Unix seconds as RFC 3339 UTC to the second ("2026-11-25T11:18:20Z"). */
void loom_rfc3339_format_seconds(int64_t unix_s, char *buf, size_t size);

/* Sleeps for ms milliseconds (resumes after signals). */
void loom_sleep_ms(int64_t ms);

/* Capped exponential backoff with full jitter: a random delay in
 * [base/2, min(cap, base * 2^attempt)] milliseconds. attempt starts at 0. */
int64_t loom_backoff_ms(int attempt, int64_t base_ms, int64_t cap_ms);

#endif
