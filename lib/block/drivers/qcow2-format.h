/* qcow2 on-disk format (QEMU docs/interop/qcow2.txt, versions 2 and 3).
 *
 * Every multi-byte field on disk is big-endian.  The structs below are the
 * exact on-disk layout (packed) and are only ever used through memcpy +
 * be*toh; never dereference a pointer into an image buffer as one.
 */
#ifndef PMS_QCOW2_FORMAT_H
#define PMS_QCOW2_FORMAT_H

#include <stdint.h>

#define QCOW2_MAGIC 0x514649fbu           /* "QFI\xfb" */

struct qcow2_header {
    uint32_t magic;                   /* QCOW2_MAGIC */
    uint32_t version;                 /* 2 or 3 */
    uint64_t backing_file_offset;     /* offset of the backing file name, 0 = none */
    uint32_t backing_file_size;       /* length of that name, < 1024, no NUL */
    uint32_t cluster_bits;            /* log2 cluster size, 9..21 */
    uint64_t size;                    /* virtual disk size in bytes */
    uint32_t crypt_method;            /* 0 none, 1 AES (refused), 2 LUKS (refused) */
    uint32_t l1_size;                 /* number of L1 entries */
    uint64_t l1_table_offset;         /* cluster-aligned offset of the active L1 */
    uint64_t refcount_table_offset;   /* cluster-aligned offset of the refcount table */
    uint32_t refcount_table_clusters; /* refcount table length in clusters */
    uint32_t nb_snapshots;            /* number of internal snapshots */
    uint64_t snapshots_offset;        /* 8-aligned offset of the snapshot table */
    /* version 3 only: */
    uint64_t incompatible_features;   /* QCOW2_INCOMPAT_* */
    uint64_t compatible_features;     /* QCOW2_COMPAT_* */
    uint64_t autoclear_features;      /* QCOW2_AUTOCLEAR_* */
    uint32_t refcount_order;          /* refcount width = 1 << order bits, 0..6 */
    uint32_t header_length;           /* bytes of this header, >= 104, multiple of 8 */
    uint8_t  compression_type;        /* 0 zlib, 1 zstd (needs INCOMPAT_COMPRESSION) */
    uint8_t  padding[7];              /* pads to 112 bytes */
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_header) == 112, "qcow2 header is 112 bytes");
#define QCOW2_V2_HEADER_LEN 72
#define QCOW2_V3_MIN_HEADER_LEN 104

/* Incompatible feature bits: an unknown one refuses the open. */
#define QCOW2_INCOMPAT_DIRTY        (1ull << 0)   /* refcounts may be stale */
#define QCOW2_INCOMPAT_CORRUPT      (1ull << 1)   /* metadata known corrupt: read-only */
#define QCOW2_INCOMPAT_DATA_FILE    (1ull << 2)   /* external data file (refused) */
#define QCOW2_INCOMPAT_COMPRESSION  (1ull << 3)   /* compression_type field valid */
#define QCOW2_INCOMPAT_EXTL2        (1ull << 4)   /* extended (128-bit) L2 entries */
#define QCOW2_INCOMPAT_KNOWN (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | \
                              QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)
/* Compatible feature bits: ignored when unknown. */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
/* Autoclear feature bits: a writer that does not maintain one clears it. */
#define QCOW2_AUTOCLEAR_BITMAPS     (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_RAW    (1ull << 1)
#define QCOW2_AUTOCLEAR_KNOWN       0ull          /* we maintain none of them */

#define QCOW2_COMPRESSION_ZLIB 0
#define QCOW2_COMPRESSION_ZSTD 1

/* Header extensions: after the header, each {type, length, data padded to 8}. */
struct qcow2_ext_header {
    uint32_t type;                    /* QCOW2_EXT_* */
    uint32_t len;                     /* data length, without padding */
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_ext_header) == 8, "extension header is 8 bytes");
#define QCOW2_EXT_END            0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE  0x6803f857u
#define QCOW2_EXT_BITMAPS        0x23852875u
#define QCOW2_EXT_CRYPTO         0x0537be77u
#define QCOW2_EXT_DATA_FILE      0x44415441u

struct qcow2_feature_name {
    uint8_t type;                     /* 0 incompatible, 1 compatible, 2 autoclear */
    uint8_t bit;                      /* bit number 0..63 */
    char    name[46];                 /* NUL-padded */
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_feature_name) == 48, "feature name entry is 48 bytes");

/* L1 entry */
#define L1E_OFFSET_MASK   0x00fffffffffffe00ull   /* bits 9-55: L2 table offset */
#define L1E_RESERVED_MASK 0x7f000000000001ffull
/* L2 entry (standard part) */
#define QCOW_OFLAG_COPIED     (1ull << 63)        /* refcount is exactly 1 */
#define QCOW_OFLAG_COMPRESSED (1ull << 62)
#define QCOW_OFLAG_ZERO       (1ull << 0)         /* v3: reads as zeroes */
#define L2E_OFFSET_MASK   0x00fffffffffffe00ull   /* bits 9-55: host cluster offset */
#define L2E_STD_RESERVED_MASK 0x3f000000000001feull
/* Extended L2: second 64 bits: bits 0-31 allocated, 32-63 reads-as-zero. */
#define QCOW2_SUBCLUSTERS 32

/* Refcount table entry: bits 9-63 offset of a refcount block; 0 = none. */
#define REFT_OFFSET_MASK  0xfffffffffffffe00ull

/* Snapshot table entry (followed by extra data, id string, name, padding). */
struct qcow2_snapshot_header {
    uint64_t l1_table_offset;         /* L1 table of the snapshot */
    uint32_t l1_size;                 /* its number of entries */
    uint16_t id_str_size;             /* length of the unique id string */
    uint16_t name_size;               /* length of the name */
    uint32_t date_sec;                /* creation time */
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;           /* guest clock at creation */
    uint32_t vm_state_size;           /* saved VM state size (32-bit; see extra) */
    uint32_t extra_data_size;         /* bytes of extra data that follow */
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_snapshot_header) == 40, "snapshot header is 40 bytes");

struct qcow2_snapshot_extra {
    uint64_t vm_state_size_large;     /* 64-bit VM state size */
    uint64_t disk_size;               /* virtual size at snapshot time (v3 requires) */
    uint64_t icount;                  /* instruction count, -1 if none */
} __attribute__((packed));
_Static_assert(sizeof(struct qcow2_snapshot_extra) == 24, "snapshot extra is 24 bytes");

/* Limits (as QEMU enforces them). */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_SNAPSHOT_EXTRA 1024
#define QCOW2_MAX_L1_BYTES (32u << 20)
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_MAX_SNAPSHOT_TABLE (64u << 20)
#define QCOW2_MAX_HOST_OFFSET ((1ull << 56) - 1)

#endif
