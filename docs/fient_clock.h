/*
 * fient_clock.h: read the fient clock segment from C, header only.
 *
 * The fient daemon publishes what it knows about the time in a small
 * shared-memory file (by default /dev/shm/fient-clock). This header maps it
 * and answers "what time is it?" with an interval that holds the true time,
 * the same answer as the Rust reader (service::shm::ShmReader) gives: one
 * vDSO clock read and a few loads, no system call. docs/SHM.md describes
 * the layout byte by byte and the reasoning behind it.
 *
 *     const struct fient_clock_segment *seg;
 *     struct fient_clock_interval now;
 *     if (fient_clock_open(FIENT_CLOCK_DEFAULT_PATH, &seg) == 0 &&
 *         fient_clock_now(seg, &now) == 0)
 *         printf("%lld..%lld status %u\n", (long long)now.earliest_ns,
 *                (long long)now.latest_ns, now.status);
 *
 * Needs Linux on a 64-bit little-endian machine (x86_64, aarch64) and GCC
 * or Clang (for __atomic builtins and __int128). Link with nothing extra.
 * Under a strict -std=c11 (or c99), define _DEFAULT_SOURCE before the first
 * #include, for clock_gettime and CLOCK_BOOTTIME; the default GNU dialects
 * need nothing.
 */
#ifndef FIENT_CLOCK_H
#define FIENT_CLOCK_H

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define FIENT_CLOCK_DEFAULT_PATH "/dev/shm/fient-clock"
#define FIENT_CLOCK_MAGIC "FIENTCLK" /* 8 bytes, no terminator in the file */
#define FIENT_CLOCK_VERSION 1u
#define FIENT_CLOCK_SIZE 256u
/* The clock as_of_mono and void_after_mono are on (see docs/SHM.md). */
#define FIENT_CLOCK_AGING_CLOCK CLOCK_BOOTTIME

/* status */
#define FIENT_CLOCK_UNSYNCHRONIZED 0
#define FIENT_CLOCK_SYNCHRONIZED 1
#define FIENT_CLOCK_STALE 2
#define FIENT_CLOCK_DISAGREEMENT 3

/* leap: a leap second at the end of the UTC day holding as_of_real */
#define FIENT_CLOCK_LEAP_NONE 0
#define FIENT_CLOCK_LEAP_INSERT 1
#define FIENT_CLOCK_LEAP_DELETE 2

/* Errors (negative; 0 is success). */
#define FIENT_CLOCK_ERR_OPEN -1        /* open, fstat or mmap failed: see errno */
#define FIENT_CLOCK_ERR_MAGIC -2       /* not a fient clock segment */
#define FIENT_CLOCK_ERR_NEWER -3       /* layout version newer than this header */
#define FIENT_CLOCK_ERR_OLDER -4       /* layout version older than this header */
#define FIENT_CLOCK_ERR_TOO_SMALL -5   /* file or declared size below the layout */
#define FIENT_CLOCK_ERR_OTHER_BOOT -6  /* written before the last reboot */
#define FIENT_CLOCK_ERR_BUSY -7        /* kept changing while being read */
#define FIENT_CLOCK_ERR_MALFORMED -8   /* a field holds a value no writer writes */

/* The segment, layout version 1. Native byte order (little-endian on every
 * supported machine). Every field is read with an atomic load. */
struct fient_clock_segment {
    char magic[8];            /*   0 "FIENTCLK" */
    uint32_t version;         /*   8 layout version, 1 */
    uint32_t size;            /*  12 bytes in the segment, 256 */
    uint64_t seq;             /*  16 seqlock: odd while the writer writes */
    int64_t as_of_mono;       /*  24 CLOCK_BOOTTIME, ns, of the estimate */
    int64_t as_of_real;       /*  32 CLOCK_REALTIME, ns since 1970, then */
    int64_t offset_low_ns;    /*  40 true time - CLOCK_REALTIME >= this */
    int64_t offset_high_ns;   /*  48 ... and <= this, at as_of */
    uint32_t max_drift_ppb;   /*  56 widening with age, parts per billion */
    uint32_t status;          /*  60 FIENT_CLOCK_UNSYNCHRONIZED etc. */
    int64_t void_after_mono;  /*  64 CLOCK_BOOTTIME after which: stale */
    uint32_t leap;            /*  72 FIENT_CLOCK_LEAP_NONE etc. */
    uint32_t reserved0;       /*  76 zero */
    uint8_t boot_id[16];      /*  80 /proc/sys/kernel/random/boot_id bytes */
    uint8_t reserved[160];    /*  96 zero: room for growth */
};

_Static_assert(sizeof(struct fient_clock_segment) == FIENT_CLOCK_SIZE, "segment size");
_Static_assert(offsetof(struct fient_clock_segment, seq) == 16, "seq offset");
_Static_assert(offsetof(struct fient_clock_segment, as_of_mono) == 24, "as_of_mono offset");
_Static_assert(offsetof(struct fient_clock_segment, max_drift_ppb) == 56, "max_drift_ppb offset");
_Static_assert(offsetof(struct fient_clock_segment, void_after_mono) == 64, "void_after offset");
_Static_assert(offsetof(struct fient_clock_segment, boot_id) == 80, "boot_id offset");

/* One consistent copy of the data fields. */
struct fient_clock_snapshot {
    int64_t as_of_mono;
    int64_t as_of_real;
    int64_t offset_low_ns;
    int64_t offset_high_ns;
    uint32_t max_drift_ppb;
    uint32_t status;
    int64_t void_after_mono;
    uint32_t leap;
    uint8_t boot_id[16];
};

/* The true time is in [earliest_ns, latest_ns], ns since 1970 (UTC as
 * CLOCK_REALTIME counts it). */
struct fient_clock_interval {
    int64_t earliest_ns;
    int64_t latest_ns;
    uint32_t status;
};

/* 128-bit arithmetic, so that no sum of two fields can overflow. */
__extension__ typedef __int128 fient_clock__i128;
__extension__ typedef unsigned __int128 fient_clock__u128;

static inline int64_t fient_clock__clamp(fient_clock__i128 v)
{
    if (v > (fient_clock__i128)INT64_MAX)
        return INT64_MAX;
    if (v < (fient_clock__i128)INT64_MIN)
        return INT64_MIN;
    return (int64_t)v;
}

/* The interval a snapshot gives when CLOCK_BOOTTIME reads mono_now. Pure;
 * the same rules as service::shm::interval_at, which docs/SHM.md spells
 * out. The snapshot must have passed fient_clock_read's checks. */
static inline void fient_clock_interval_at(const struct fient_clock_snapshot *s,
                                           int64_t mono_now,
                                           struct fient_clock_interval *out)
{
    const fient_clock__i128 second = 1000000000, day = (fient_clock__i128)86400 * 1000000000;
    if (s->status == FIENT_CLOCK_UNSYNCHRONIZED) {
        out->earliest_ns = INT64_MIN;
        out->latest_ns = INT64_MAX;
        out->status = FIENT_CLOCK_UNSYNCHRONIZED;
        return;
    }
    fient_clock__i128 age = (fient_clock__i128)mono_now - s->as_of_mono;
    fient_clock__u128 abs_age = age < 0 ? (fient_clock__u128)(-age) : (fient_clock__u128)age;
    /* ceil(|age| * ppb / 1e9): the drift bound holds both ways in time. */
    fient_clock__i128 widen = (fient_clock__i128)((abs_age * s->max_drift_ppb + 999999999u) / 1000000000u);
    fient_clock__i128 real = (fient_clock__i128)s->as_of_real + age;
    fient_clock__i128 lo = real + s->offset_low_ns - widen;
    fient_clock__i128 hi = real + s->offset_high_ns + widen;
    fient_clock__i128 days = (fient_clock__i128)s->as_of_real / day;
    if ((fient_clock__i128)s->as_of_real % day < 0)
        days -= 1; /* floor, before 1970 too */
    fient_clock__i128 midnight = (days + 1) * day;
    if (s->leap == FIENT_CLOCK_LEAP_INSERT) {
        if (lo >= midnight) {
            lo -= second;
            hi -= second;
        } else if (hi >= midnight) {
            lo = lo < midnight - second ? lo : midnight - second;
            hi = hi - second > midnight - 1 ? hi - second : midnight - 1;
        }
    } else if (s->leap == FIENT_CLOCK_LEAP_DELETE) {
        if (lo >= midnight - second) {
            lo += second;
            hi += second;
        } else if (hi >= midnight - second) {
            hi += second;
        }
    }
    out->earliest_ns = fient_clock__clamp(lo);
    out->latest_ns = fient_clock__clamp(hi);
    out->status = (s->status == FIENT_CLOCK_STALE || mono_now > s->void_after_mono)
                      ? FIENT_CLOCK_STALE
                      : (s->status == FIENT_CLOCK_DISAGREEMENT ? FIENT_CLOCK_DISAGREEMENT
                                                                : FIENT_CLOCK_SYNCHRONIZED);
}

/* Reads one consistent snapshot (the reader's half of the seqlock) and
 * checks it. 0, FIENT_CLOCK_ERR_BUSY or FIENT_CLOCK_ERR_MALFORMED. */
static inline int fient_clock_read(const struct fient_clock_segment *seg,
                                   struct fient_clock_snapshot *out)
{
    for (int attempt = 0; attempt < 1100; attempt++) {
        uint64_t before = __atomic_load_n(&seg->seq, __ATOMIC_ACQUIRE);
        if ((before & 1) == 0) {
            out->as_of_mono = __atomic_load_n(&seg->as_of_mono, __ATOMIC_RELAXED);
            out->as_of_real = __atomic_load_n(&seg->as_of_real, __ATOMIC_RELAXED);
            out->offset_low_ns = __atomic_load_n(&seg->offset_low_ns, __ATOMIC_RELAXED);
            out->offset_high_ns = __atomic_load_n(&seg->offset_high_ns, __ATOMIC_RELAXED);
            out->max_drift_ppb = __atomic_load_n(&seg->max_drift_ppb, __ATOMIC_RELAXED);
            out->status = __atomic_load_n(&seg->status, __ATOMIC_RELAXED);
            out->void_after_mono = __atomic_load_n(&seg->void_after_mono, __ATOMIC_RELAXED);
            out->leap = __atomic_load_n(&seg->leap, __ATOMIC_RELAXED);
            uint64_t id[2];
            id[0] = __atomic_load_n((const uint64_t *)(const void *)&seg->boot_id[0], __ATOMIC_RELAXED);
            id[1] = __atomic_load_n((const uint64_t *)(const void *)&seg->boot_id[8], __ATOMIC_RELAXED);
            memcpy(out->boot_id, id, sizeof id);
            /* If a load above saw a write that began after `before`, the
             * odd sequence number that began it is visible below. */
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (__atomic_load_n(&seg->seq, __ATOMIC_RELAXED) == before) {
                if (out->status > FIENT_CLOCK_DISAGREEMENT || out->leap > FIENT_CLOCK_LEAP_DELETE ||
                    (out->status != FIENT_CLOCK_UNSYNCHRONIZED &&
                     out->offset_low_ns > out->offset_high_ns))
                    return FIENT_CLOCK_ERR_MALFORMED;
                return 0;
            }
        }
        if (attempt >= 100)
            sched_yield(); /* the writer may be preempted mid-update */
    }
    return FIENT_CLOCK_ERR_BUSY;
}

/* The true time now. 0 or a FIENT_CLOCK_ERR_*. The clock is read after the
 * snapshot, so its age is never negative on one host. */
static inline int fient_clock_now(const struct fient_clock_segment *seg,
                                  struct fient_clock_interval *out)
{
    struct fient_clock_snapshot s;
    int rc = fient_clock_read(seg, &s);
    if (rc != 0)
        return rc;
    struct timespec ts;
    clock_gettime(FIENT_CLOCK_AGING_CLOCK, &ts);
    fient_clock_interval_at(&s, (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec, out);
    return 0;
}

/* This boot's id as 16 bytes; 0, or -1 if it cannot be read. */
static inline int fient_clock__boot_id(uint8_t id[16])
{
    char text[64];
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (!f)
        return -1;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = 0;
    int got = 0;
    for (size_t i = 0; i < n && got < 32; i++) {
        char c = text[i];
        int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
        if (v < 0)
            continue;
        if (got % 2 == 0)
            id[got / 2] = (uint8_t)(v << 4);
        else
            id[got / 2] |= (uint8_t)v;
        got++;
    }
    return got == 32 ? 0 : -1;
}

/* Maps the segment at `path` read-only and checks its magic, version, size
 * and boot. 0 or a FIENT_CLOCK_ERR_*; on success *out stays valid until
 * fient_clock_close. */
static inline int fient_clock_open(const char *path, const struct fient_clock_segment **out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return FIENT_CLOCK_ERR_OPEN;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        errno = e;
        return FIENT_CLOCK_ERR_OPEN;
    }
    if (st.st_size < (off_t)FIENT_CLOCK_SIZE) {
        close(fd);
        return FIENT_CLOCK_ERR_TOO_SMALL;
    }
    void *addr = mmap(NULL, FIENT_CLOCK_SIZE, PROT_READ, MAP_SHARED, fd, 0);
    int e = errno;
    close(fd);
    if (addr == MAP_FAILED) {
        errno = e;
        return FIENT_CLOCK_ERR_OPEN;
    }
    const struct fient_clock_segment *seg = addr;
    int rc = 0;
    uint32_t version = __atomic_load_n(&seg->version, __ATOMIC_RELAXED);
    if (memcmp(seg->magic, FIENT_CLOCK_MAGIC, 8) != 0)
        rc = FIENT_CLOCK_ERR_MAGIC;
    else if (version > FIENT_CLOCK_VERSION)
        rc = FIENT_CLOCK_ERR_NEWER;
    else if (version < FIENT_CLOCK_VERSION)
        rc = FIENT_CLOCK_ERR_OLDER;
    else if (__atomic_load_n(&seg->size, __ATOMIC_RELAXED) < FIENT_CLOCK_SIZE)
        rc = FIENT_CLOCK_ERR_TOO_SMALL;
    if (rc == 0) {
        struct fient_clock_snapshot s;
        static const uint8_t unknown[16];
        uint8_t ours[16];
        rc = fient_clock_read(seg, &s);
        if (rc == FIENT_CLOCK_ERR_MALFORMED)
            rc = 0; /* the data may be fixed by the next write */
        if (rc == 0 && fient_clock__boot_id(ours) == 0 &&
            memcmp(s.boot_id, unknown, 16) != 0 && memcmp(s.boot_id, ours, 16) != 0)
            rc = FIENT_CLOCK_ERR_OTHER_BOOT;
    }
    if (rc != 0) {
        munmap(addr, FIENT_CLOCK_SIZE);
        return rc;
    }
    *out = seg;
    return 0;
}

static inline void fient_clock_close(const struct fient_clock_segment *seg)
{
    munmap((void *)seg, FIENT_CLOCK_SIZE);
}

#endif /* FIENT_CLOCK_H */
