/* placeholder */
#include "qcow2.h"
#include "../../util/error.h"
int qcow2_check(struct bdev *bs, unsigned flags, struct pms_check_result *res,
                pms_check_msg_fn fn, void *opaque)
{ (void)bs; (void)flags; (void)res; (void)fn; (void)opaque; return pms_err(ENOTSUP, "check not implemented"); }
