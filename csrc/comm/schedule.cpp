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

namespace {

// A rank's place on a row-major grid: its coordinate and stride per dimension.
struct Grid {
  std::vector<int> shape, stride, coord;
  int rank = 0;

  Grid(int r, const std::vector<int>& sides) : shape(sides), stride(sides.size()), coord(sides.size()), rank(r) {
    long long prod = 1;
    for (int d : shape) {
      if (d < 1) throw std::invalid_argument("torus shape sides must be >= 1, got " + std::to_string(d));
      prod *= d;
    }
    if (rank < 0 || rank >= prod) throw std::invalid_argument("rank outside the torus shape");
    for (int i = static_cast<int>(shape.size()) - 1, s = 1; i >= 0; --i) {
      stride[i] = s;
      coord[i] = (rank / s) % shape[i];
      s *= shape[i];
    }
  }

  int size() const { return shape.empty() ? 1 : stride[0] * shape[0]; }

  // The ranks in this rank's line along dimension i, by coordinate.
  std::vector<int> line(int i) const {
    std::vector<int> g(shape[i]);
    for (int x = 0; x < shape[i]; ++x) g[x] = rank + (x - coord[i]) * stride[i];
    return g;
  }

  // The region split along each dimension of side > 1, first dimension first:
  // the whole, then this rank's part of it, and so on (the last split leaves
  // this rank's final part).
  std::vector<Region> parents(Region whole) const {
    std::vector<Region> out;
    for (size_t i = 0; i < shape.size(); ++i) {
      if (shape[i] == 1) continue;
      out.push_back(whole);
      whole = split_region(whole, shape[i])[coord[i]];
    }
    return out;
  }
};

// Ring reduce-scatters along each dimension in turn, each on the part the
// previous one left this rank.
void append_torus_rs(std::vector<Step>& steps, const std::vector<Region>& parents, const Grid& g) {
  size_t j = 0;
  for (size_t i = 0; i < g.shape.size(); ++i) {
    if (g.shape[i] == 1) continue;
    append_ring_rs(steps, split_region(parents[j++], g.shape[i]), g.line(static_cast<int>(i)), g.coord[i]);
  }
}

// Ring allgathers in the reverse order, each widening this rank's part to its parent.
void append_torus_ag(std::vector<Step>& steps, const std::vector<Region>& parents, const Grid& g) {
  size_t j = parents.size();
  for (int i = static_cast<int>(g.shape.size()) - 1; i >= 0; --i) {
    if (g.shape[i] == 1) continue;
    append_ring_ag(steps, split_region(parents[--j], g.shape[i]), g.line(i), g.coord[i]);
  }
}

}  // namespace

std::vector<Step> torus_allreduce(size_t n, int rank, const std::vector<int>& shape) {
  Grid g(rank, shape);
  std::vector<Region> parents = g.parents({0, n});
  std::vector<Step> steps;
  append_torus_rs(steps, parents, g);
  append_torus_ag(steps, parents, g);
  return steps;
}

std::vector<Step> torus_reduce_scatter(size_t block, int rank, const std::vector<int>& shape) {
  Grid g(rank, shape);
  std::vector<Step> steps;
  // `size` blocks split evenly at every dimension: this rank's last part is its own block (row-major order).
  append_torus_rs(steps, g.parents({0, block * static_cast<size_t>(g.size())}), g);
  return steps;
}

std::vector<Step> torus_allgather(size_t block, int rank, const std::vector<int>& shape) {
  Grid g(rank, shape);
  std::vector<Step> steps;
  append_torus_ag(steps, g.parents({0, block * static_cast<size_t>(g.size())}), g);
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
