// Per-row epilogues compiled for AVX-512 (F/DQ/BW/VL); chosen at run time only where the CPU
// has them.  Only standard headers are included (before the pragma), see loss_rows_avx2.cpp.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi,bmi2,f16c")
#define COPSD_ISA avx512
#define COPSD_HAVE_AVX512 1  // the pragma does not define __AVX512F__ / __AVX2__
#include "loss_rows.h"
#else
#define COPSD_ISA avx512
#include "loss_rows.h"
#endif
