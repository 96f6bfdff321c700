#include <stdio.h>
#include "pmemsnap.h"
int main(void) { fprintf(stderr, "pmemsnap: not yet\n"); return 1; }
