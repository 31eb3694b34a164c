// Per-row epilogues compiled for AVX2 + FMA; chosen at run time only where the CPU has them.
// Only standard headers are included (before the pragma) so no torch inline function is
// ever emitted with these instructions.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
#define COPSD_ISA avx2
#define COPSD_HAVE_AVX2 1  // the pragma does not define __AVX512F__ / __AVX2__
#include "loss_rows.h"
#else
#define COPSD_ISA avx2
#include "loss_rows.h"
#endif
