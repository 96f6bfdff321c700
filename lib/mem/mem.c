/* Memory device — placeholder until lib/mem lands. */
#include "pms-dev.h"
#include "util/error.h"
int pms_mem_map(pms_dev *d, const struct pms_map_opts *o, struct pms_mem **m, void **a, size_t *l)
{ (void)d; (void)o; (void)m; (void)a; (void)l; return pms_err(ENOTSUP, "not implemented"); }
int pms_mem_unmap(struct pms_mem *m) { (void)m; return 0; }
int pms_mem_persist(struct pms_mem *m, const void *a, size_t l) { (void)m; (void)a; (void)l; return -ENOTSUP; }
int pms_mem_pread(struct pms_mem *m, void *b, size_t l, uint64_t o) { (void)m; (void)b; (void)l; (void)o; return -ENOTSUP; }
int pms_mem_pwrite(struct pms_mem *m, const void *b, size_t l, uint64_t o) { (void)m; (void)b; (void)l; (void)o; return -ENOTSUP; }
int pms_mem_write_zeroes(struct pms_mem *m, size_t l, uint64_t o) { (void)m; (void)l; (void)o; return -ENOTSUP; }
int pms_mem_discard(struct pms_mem *m, size_t l, uint64_t o) { (void)m; (void)l; (void)o; return -ENOTSUP; }
int pms_mem_flush(struct pms_mem *m) { (void)m; return -ENOTSUP; }
int pms_mem_snapshot_create(struct pms_mem *m, const char *n, unsigned f) { (void)m; (void)n; (void)f; return -ENOTSUP; }
int pms_mem_snapshot_revert(struct pms_mem *m, const char *n) { (void)m; (void)n; return -ENOTSUP; }
int pms_mem_stats(struct pms_mem *m, struct pms_stats *s) { (void)m; (void)s; return -ENOTSUP; }
