// Included first by every kernel source: forbids the compiler from fusing a
// multiply and an add into one FMA on its own (GCC does so by default in C++).
// Every path must round exactly like scalar.cpp, so the only fused
// multiply-adds are the explicit ones (std::fma, _mm256_fmadd_ps, svmla).
#pragma once

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
