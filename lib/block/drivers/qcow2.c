/* in progress */
#include "qcow2.h"
#include "../../util/error.h"
static int p(const uint8_t *b, size_t l) { (void)b; (void)l; return 0; }
static int o(struct bdev *bs, const char *path, const struct pms_open_opts *op) { (void)bs; (void)path; (void)op; return pms_err(ENOTSUP, "qcow2 not yet"); }
const struct pms_driver pms_drv_qcow2 = { .name = "qcow2", .probe = p, .open = o };
int qcow2_create(const char *path, uint64_t size, const struct pms_create_opts *op) { (void)path; (void)size; (void)op; return pms_err(ENOTSUP, "qcow2 not yet"); }
