#include "comm/schedule.h"

#include <stdexcept>
#include <string>

namespace rannc::comm {

std::vector<Region> split_region(Region r, int parts) {
  std::vector<Region> out(parts);
  size_t base = r.len / parts, extra = r.len % parts, off = r.off;
  for (int i = 0; i < parts; ++i) {
    size_t len = base + (static_cast<size_t>(i) < extra ? 1 : 0);
    out[i] = {off, len};
    off += len;
  }
  return out;
}

namespace {

int mod(int a, int b) { return ((a % b) + b) % b; }

// Append a ring reduce-scatter over `chunks` among `group` (this rank is
// group[me]); afterwards chunks[me] holds the group's sum.
void append_ring_rs(std::vector<Step>& steps, const std::vector<Region>& chunks,
                    const std::vector<int>& group, int me) {
  int d = static_cast<int>(group.size());
  int next = group[mod(me + 1, d)], prev = group[mod(me - 1, d)];
  for (int s = 0; s + 1 < d; ++s) {
    Step st;
    st.reduce = true;
    st.tag = static_cast<int>(steps.size());
    st.sends.push_back({next, chunks[mod(me - s - 1, d)]});
    st.recvs.push_back({prev, chunks[mod(me - s - 2, d)]});
    steps.push_back(std::move(st));
  }
}

// Append a ring allgather: this rank holds chunks[me]; afterwards all.
void append_ring_ag(std::vector<Step>& steps, const std::vector<Region>& chunks,
                    const std::vector<int>& group, int me) {
  int d = static_cast<int>(group.size());
  int next = group[mod(me + 1, d)], prev = group[mod(me - 1, d)];
  for (int s = 0; s + 1 < d; ++s) {
    Step st;
    st.tag = static_cast<int>(steps.size());
    st.sends.push_back({next, chunks[mod(me - s, d)]});
    st.recvs.push_back({prev, chunks[mod(me - s - 1, d)]});
    steps.push_back(std::move(st));
  }
}

std::vector<int> all_ranks(int size) {
  std::vector<int> g(size);
  for (int i = 0; i < size; ++i) g[i] = i;
  return g;
}

}  // namespace

std::vector<Step> ring_allreduce(size_t n, int rank, int size) {
  return torus_allreduce(n, rank, {size});
}

std::vector<Step> torus_allreduce(size_t n, int rank, const std::vector<int>& shape) {
  int ndims = static_cast<int>(shape.size());
  long long prod = 1;
  for (int d : shape) {
    if (d < 1) throw std::invalid_argument("torus shape sides must be >= 1, got " + std::to_string(d));
    prod *= d;
  }
  if (rank < 0 || rank >= prod) throw std::invalid_argument("rank outside the torus shape");
  std::vector<int> stride(ndims), coord(ndims);
  for (int i = ndims - 1, s = 1; i >= 0; --i) {
    stride[i] = s;
    coord[i] = (rank / s) % shape[i];
    s *= shape[i];
  }
  auto group_of = [&](int i) {
    std::vector<int> g(shape[i]);
    for (int x = 0; x < shape[i]; ++x) g[x] = rank + (x - coord[i]) * stride[i];
    return g;
  };
  std::vector<Step> steps;
  std::vector<Region> parents;
  Region cur{0, n};
  for (int i = 0; i < ndims; ++i) {
    if (shape[i] == 1) continue;
    std::vector<Region> chunks = split_region(cur, shape[i]);
    append_ring_rs(steps, chunks, group_of(i), coord[i]);
    parents.push_back(cur);
    cur = chunks[coord[i]];
  }
  for (int i = ndims - 1; i >= 0; --i) {
    if (shape[i] == 1) continue;
    cur = parents.back();
    parents.pop_back();
    append_ring_ag(steps, split_region(cur, shape[i]), group_of(i), coord[i]);
  }
  return steps;
}

std::vector<Step> halving_doubling_allreduce(size_t n, int rank, int size) {
  int p = 1, levels = 0;
  while (p * 2 <= size) {
    p *= 2;
    ++levels;
  }
  const int r = size - p;
  const Region full{0, n};
  const int last_tag = 1 + 2 * levels;
  std::vector<Step> steps;
  int v = -1;  // this rank's index among the p ranks of the power-of-two core
  if (rank < 2 * r) {
    Step st;
    st.tag = 0;
    if (rank % 2 == 0) {
      st.sends.push_back({rank + 1, full});
    } else {
      st.reduce = true;
      st.recvs.push_back({rank - 1, full});
      v = rank / 2;
    }
    steps.push_back(std::move(st));
  } else {
    v = rank - r;
  }
  if (v >= 0) {
    auto real = [r](int w) { return w < r ? 2 * w + 1 : w + r; };
    struct Level {
      Region parent;
      bool kept_low;
    };
    std::vector<Level> levels_seen;
    Region cur = full;
    int tag = 1;
    for (int dist = p / 2; dist >= 1; dist /= 2) {
      Region lo{cur.off, cur.len / 2}, hi{cur.off + cur.len / 2, cur.len - cur.len / 2};
      bool keep_lo = (v & dist) == 0;
      Step st;
      st.reduce = true;
      st.tag = tag++;
      st.sends.push_back({real(v ^ dist), keep_lo ? hi : lo});
      st.recvs.push_back({real(v ^ dist), keep_lo ? lo : hi});
      steps.push_back(std::move(st));
      levels_seen.push_back({cur, keep_lo});
      cur = keep_lo ? lo : hi;
    }
    for (int dist = 1; dist <= p / 2; dist *= 2) {
      Level lv = levels_seen.back();
      levels_seen.pop_back();
      Region other = lv.kept_low ? Region{lv.parent.off + cur.len, lv.parent.len - cur.len}
                                 : Region{lv.parent.off, lv.parent.len - cur.len};
      Step st;
      st.tag = tag++;
      st.sends.push_back({real(v ^ dist), cur});
      st.recvs.push_back({real(v ^ dist), other});
      steps.push_back(std::move(st));
      cur = lv.parent;
    }
  }
  if (rank < 2 * r) {
    Step st;
    st.tag = last_tag;
    if (rank % 2 == 0) {
      st.recvs.push_back({rank + 1, full});
    } else {
      st.sends.push_back({rank - 1, full});
    }
    steps.push_back(std::move(st));
  }
  return steps;
}

std::vector<Step> ring_reduce_scatter(size_t block, int rank, int size) {
  std::vector<Step> steps;
  append_ring_rs(steps, split_region({0, block * size}, size), all_ranks(size), rank);
  return steps;
}

std::vector<Step> ring_allgather(size_t block, int rank, int size) {
  std::vector<Step> steps;
  append_ring_ag(steps, split_region({0, block * size}, size), all_ranks(size), rank);
  return steps;
}

}  // namespace rannc::comm
