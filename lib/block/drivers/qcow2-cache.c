/* in progress */
typedef int pms_dummy_t;
