// The CPU kernels for the DEFAULT capability: the platform's baseline ISA (SSE2 on x86-64).
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "cpu/kernels/table.h"
