// Collective algorithms as data: for one rank, the list of steps (who to send
// which part of the buffer to, who to receive which part from) that the
// executor in collective.cpp runs in order. Offsets and lengths count
// elements; a step's messages all go out together and the step ends when all
// of them have completed.
#pragma once

#include <cstddef>
#include <vector>

namespace rannc::comm {

struct Region {
  size_t off = 0;
  size_t len = 0;
};

struct Xfer {
  int peer;
  Region region;
};

struct Step {
  std::vector<Xfer> sends;
  std::vector<Xfer> recvs;
  bool reduce = false;  // received data is summed into the region (else copied)
  int tag = 0;
};

// Split `r` into `parts` consecutive pieces whose lengths differ by at most 1.
std::vector<Region> split_region(Region r, int parts);

// Allreduce of n elements over `size` ranks by a ring: reduce-scatter then
// allgather (Patarasuk & Yuan 2009).
std::vector<Step> ring_allreduce(size_t n, int rank, int size);

// Allreduce by recursive halving (reduce-scatter) and recursive doubling
// (allgather), after Rabenseifner (2004) and Thakur et al. (2005). For a rank
// count that is not a power of two, the first 2r ranks fold into r first
// (r = size - largest power of two) and get the result back at the end.
std::vector<Step> halving_doubling_allreduce(size_t n, int rank, int size);

// Allreduce with the ranks viewed as a row-major grid of `shape` (product
// equal to the rank count): a ring reduce-scatter along each dimension in
// turn, each on the part left by the previous one, then ring allgathers in
// reverse order. A one-dimensional shape is the plain ring.
std::vector<Step> torus_allreduce(size_t n, int rank, const std::vector<int>& shape);

// Reduce-scatter by a ring over `size` blocks of `block` elements: rank i
// ends with the sum of block i in its own buffer.
std::vector<Step> ring_reduce_scatter(size_t block, int rank, int size);

// Allgather by a ring over `size` blocks of `block` elements: rank i starts
// with its block i in place, and ends with every block.
std::vector<Step> ring_allgather(size_t block, int rank, int size);

// Reduce-scatter of `size` blocks of `block` elements on the grid `shape`: the
// first half of torus_allreduce; rank i ends with the sum of block i in place.
std::vector<Step> torus_reduce_scatter(size_t block, int rank, const std::vector<int>& shape);

// Allgather of `size` blocks on the grid `shape`: the second half of
// torus_allreduce; rank i starts with block i in place and ends with all.
std::vector<Step> torus_allgather(size_t block, int rank, const std::vector<int>& shape);

}  // namespace rannc::comm
