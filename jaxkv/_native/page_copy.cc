// jaxkv page kernels for XLA:CPU, called through the XLA FFI.
//
// A CPU device's memory is host memory, and a page of a shard is one
// contiguous run of bytes (the page axis is outermost). Moving a page is
// therefore one memcpy, whatever the dtype: no float op ever touches the
// bytes. XLA:CPU's own gather/scatter runs element by element and converts
// bfloat16 / float8_e5m2 through float32 (which quiets signalling NaNs), so
// these kernels replace it on CPU.

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <sched.h>   // sched_getaffinity: the cores this process may use
#include <unistd.h>  // sysconf: the L3 size where sysfs does not say

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>  // SSE2: part of every x86-64 CPU
#include <immintrin.h>  // AVX2, used only behind a runtime CPU check
#define JAXKV_STREAM_STORES 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The copy policy: which batches are copied with non-temporal (streaming)
// stores, and which are split between two threads. Both depend on the machine,
// so they are chosen from what the copy touches against the L3 actually
// present and the cores this process may run on, read once at start-up
// (`JAXKV_COPY_POLICY` overrides either, see ChoosePolicy). The measurements:
// docs/benchmarks.md, "Measurements behind the rules", "Page copy".
//
// Streaming: ordinary stores first read every destination line into the cache
// (read-for-ownership); a copy whose bytes cannot stay in the L3 gains by
// skipping that. A copy whose bytes do stay must not stream: the next transfer
// (or the user's step) would read them back from memory instead of the cache.
// A copy touches its source and its destination, 2 x batch bytes, and shares
// the L3 with everything else the process keeps warm (the cache itself, the
// model), so it streams once it touches a quarter of the L3: batch >= L3 / 8
// (on a 260 MiB L3, 16 MiB batches ran 40% faster with ordinary stores and
// 64 MiB batches 20% faster streamed).
// Threads: one core's copy stops short of what the memory system moves, and a
// thread start (tens of us) is small against a copy of a few MiB (~1 ms).
struct CopyPolicy {
  int64_t l3_bytes;          // the L3 the policy was chosen for (0: not known)
  int64_t cores;             // cores this process may run on
  int64_t stream_min_bytes;  // batches at least this large stream (INT64_MAX: never)
  int64_t split_min_bytes;   // batches at least this large run on two threads (INT64_MAX: never)
  int64_t store_bytes;       // one streaming store: 64 (AVX-512), 32 (AVX2), 16 (SSE2); 0: none (not x86-64)
};

constexpr int64_t kNever = INT64_MAX;
// Never stream below 4 MiB (nor, without a known L3, from more): an eighth of
// a 32 MiB L3, the smallest a server CPU core sees (AMD EPYC's per-CCX L3).
constexpr int64_t kStreamFloorBytes = int64_t{4} << 20;
constexpr int64_t kSplitMinBytes = int64_t{8} << 20;

// Bytes of a size such as "49152K", "32M", "1G" or "4096"; -1 if malformed.
int64_t ParseBytes(const char* s, const char** end) {
  char* e = nullptr;
  const long long v = std::strtoll(s, &e, 10);
  if (e == s || v < 0) return -1;
  int64_t scale = 1;
  switch (*e) {
    case 'K': case 'k': scale = int64_t{1} << 10; ++e; break;
    case 'M': case 'm': scale = int64_t{1} << 20; ++e; break;
    case 'G': case 'g': scale = int64_t{1} << 30; ++e; break;
    default: break;
  }
  if (*e == 'i' || *e == 'B') ++e;  // "KiB", "MB"
  if (*e == 'B') ++e;
  *end = e;
  return static_cast<int64_t>(v) * scale;
}

// The policy for an L3 of `l3_bytes` (0: unknown) and `cores`, with the
// overrides of `spec` applied: comma-separated `key=value`, keys
//   l3=SIZE         choose as if the L3 were SIZE (32M, 49152K, ...)
//   cores=N         choose as if N cores were available
//   stream=SIZE     stream batches of at least SIZE; `never`, or 0 for always
//   split=SIZE      two threads from SIZE; `never`, or 0 for always
//   store=16|32|64  streaming stores of this many bytes (SSE2, AVX2, AVX-512),
//                   at most `widest_store` (what the CPU runs): tests run each loop
// (SIZE: bytes with an optional K/M/G suffix). Returns 0, or 1 + the offset
// in `spec` of the first entry it cannot read (the policy is then unchanged).
int ChoosePolicy(const char* spec, int64_t l3_bytes, int64_t cores, int64_t widest_store, CopyPolicy* out) {
  int64_t stream = -1, split = -1, store = widest_store;
  const char* p = spec ? spec : "";
  while (*p) {
    const char* entry = p;
    const char* eq = std::strchr(p, '=');
    if (!eq) return 1 + static_cast<int>(entry - spec);
    const std::string key(p, eq - p);
    const char* v = eq + 1;
    const char* e = v;
    int64_t value;
    if (std::strncmp(v, "never", 5) == 0 && (key == "stream" || key == "split")) {
      value = kNever;
      e = v + 5;
    } else {
      value = ParseBytes(v, &e);
    }
    if (value < 0 || (*e != ',' && *e != '\0')) return 1 + static_cast<int>(entry - spec);
    if (key == "l3") l3_bytes = value;
    else if (key == "cores") cores = value;
    else if (key == "stream") stream = value;
    else if (key == "split") split = value;
    else if (key == "store" && (value == 16 || value == 32 || value == 64)) store = value;
    else return 1 + static_cast<int>(entry - spec);
    p = *e == ',' ? e + 1 : e;
  }
  out->l3_bytes = l3_bytes;
  out->cores = cores < 1 ? 1 : cores;
  const int64_t eighth = l3_bytes / 8;
  out->stream_min_bytes = stream >= 0 ? stream : (eighth > kStreamFloorBytes ? eighth : kStreamFloorBytes);
  out->split_min_bytes = split >= 0 ? split : (out->cores >= 2 ? kSplitMinBytes : kNever);
  out->store_bytes = store < widest_store ? store : widest_store;
  return 0;
}

// The widest streaming store this CPU runs (and its OS saves: libgcc checks XCR0).
int64_t MachineWidestStore() {
#ifdef JAXKV_STREAM_STORES
  if (__builtin_cpu_supports("avx512f")) return 64;
  if (__builtin_cpu_supports("avx2")) return 32;
  return 16;
#else
  return 0;
#endif
}

// The L3 one core sees: sysfs's cache level 3 of cpu 0 (per CCX on AMD, whole
// on Intel), else what the C library reports, else 0.
int64_t MachineL3Bytes() {
  for (int i = 0; i < 8; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    char level[16] = {0}, size[32] = {0};
    FILE* f = std::fopen((dir + "level").c_str(), "r");
    if (!f) continue;
    const bool got_level = std::fgets(level, sizeof level, f) != nullptr;
    std::fclose(f);
    if (!got_level || std::atoi(level) != 3) continue;
    f = std::fopen((dir + "size").c_str(), "r");
    if (!f) continue;
    const bool got_size = std::fgets(size, sizeof size, f) != nullptr;
    std::fclose(f);
    const char* e = nullptr;
    const int64_t bytes = got_size ? ParseBytes(size, &e) : -1;
    if (bytes > 0) return bytes;
  }
  long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
  l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  return l3 > 0 ? l3 : 0;
}

// Cores this process may run on (its affinity mask: `taskset` counts).
int64_t MachineCores() {
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? n : 1;
}

std::atomic<int64_t> g_stream_min_bytes{-1};  // -1: not chosen yet
std::atomic<int64_t> g_split_min_bytes{kNever};
std::atomic<int64_t> g_store_bytes{16};
std::atomic<int64_t> g_cores{1};
CopyPolicy g_policy{};  // written under g_policy_mutex, for reporting
std::mutex g_policy_mutex;

// What the copies did (`jaxkv_copy_stats`): tests assert the path a batch took, not only its bytes.
std::atomic<int64_t> g_batches{0}, g_streamed_batches{0}, g_streamed_bytes{0}, g_split_batches{0};

// (Re)choose the process's policy from the machine and `spec`; 0 or 1 + the bad offset.
int SetPolicy(const char* spec) {
  CopyPolicy policy;
  const int bad = ChoosePolicy(spec, MachineL3Bytes(), MachineCores(), MachineWidestStore(), &policy);
  if (bad) return bad;
  std::lock_guard<std::mutex> lock(g_policy_mutex);
  g_policy = policy;
  g_split_min_bytes.store(policy.split_min_bytes);
  g_cores.store(policy.cores);
  g_store_bytes.store(policy.store_bytes);
  g_stream_min_bytes.store(policy.stream_min_bytes);
  return 0;
}

// The policy in force; chosen on first use from the machine and
// $JAXKV_COPY_POLICY (malformed: the machine's defaults; Python warns).
void EnsurePolicy() {
  if (g_stream_min_bytes.load(std::memory_order_relaxed) >= 0) return;
  static std::once_flag once;
  std::call_once(once, [] {
    if (SetPolicy(std::getenv("JAXKV_COPY_POLICY")) != 0) SetPolicy("");
  });
}

#ifdef JAXKV_STREAM_STORES
// Streaming copies of one page. The page is walked 16 KiB at a time as four
// interleaved 4 KiB streams, the next 16 KiB of the source prefetched: four
// DRAM streams in flight, as glibc's memcpy does for its own large copies.
// With 64-byte stores (AVX-512: a whole line per store) this runs at
// 0.94-1.03x of one contiguous memcpy of the batch, 32-byte stores (AVX2)
// 0.85-0.92x, the 16-byte SSE2 loop 0.72-0.77x (docs/benchmarks.md,
// "Measurements behind the rules", "Page copy"). A `Store128*` copies 128
// bytes from `s` to `d` (d 64-byte aligned) with streaming stores.
constexpr size_t kStreamBlock = 4096, kStreamStreams = 4, kStreamSpan = kStreamBlock * kStreamStreams;

// The loop, written once and expanded in each target's function so that
// `Store` (an inline function of the same target) inlines into it.
#define JAXKV_STREAM_LOOP(Store)                                                          \
  size_t head = (-reinterpret_cast<uintptr_t>(dst)) & 63; /* align stores to a line */  \
  if (head > n) head = n;                                                                 \
  std::memcpy(dst, src, head);                                                            \
  size_t base = head;                                                                     \
  for (; base + kStreamSpan <= n; base += kStreamSpan) {                                  \
    for (size_t off = 0; off < kStreamBlock; off += 128) {                                \
      for (size_t k = 0; k < kStreamStreams; ++k) {                                       \
        const uint8_t* s = src + base + k * kStreamBlock + off;                           \
        _mm_prefetch(reinterpret_cast<const char*>(s + kStreamSpan), _MM_HINT_T0);        \
        _mm_prefetch(reinterpret_cast<const char*>(s + kStreamSpan + 64), _MM_HINT_T0);   \
        Store(dst + base + k * kStreamBlock + off, s);                                    \
      }                                                                                   \
    }                                                                                     \
  }                                                                                       \
  for (; base + 128 <= n; base += 128) Store(dst + base, src + base);                     \
  std::memcpy(dst + base, src + base, n - base);

__attribute__((target("avx512f"))) inline void Store128Avx512(uint8_t* d, const uint8_t* s) {
  const __m512i a = _mm512_loadu_si512(s), b = _mm512_loadu_si512(s + 64);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(d), a);
  _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 64), b);
}

__attribute__((target("avx2"))) inline void Store128Avx2(uint8_t* d, const uint8_t* s) {
  for (size_t i = 0; i < 128; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
  }
}

inline void Store128Sse2(uint8_t* d, const uint8_t* s) {
  for (size_t i = 0; i < 128; i += 16) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
  }
}

__attribute__((target("avx512f"))) void StreamAvx512(uint8_t* dst, const uint8_t* src, size_t n) {
  JAXKV_STREAM_LOOP(Store128Avx512)
}

__attribute__((target("avx2"))) void StreamAvx2(uint8_t* dst, const uint8_t* src, size_t n) {
  JAXKV_STREAM_LOOP(Store128Avx2)
}

void StreamSse2(uint8_t* dst, const uint8_t* src, size_t n) { JAXKV_STREAM_LOOP(Store128Sse2) }
#endif

// Copy `n` bytes; `stream`: with non-temporal stores (ForPages fences them).
inline void CopyPage(uint8_t* dst, const uint8_t* src, size_t n, bool stream) {
#ifdef JAXKV_STREAM_STORES
  if (stream) {  // the policy's store width: the widest the CPU runs unless overridden
    const int64_t width = g_store_bytes.load(std::memory_order_relaxed);
    if (width == 64) {
      StreamAvx512(dst, src, n);
    } else if (width == 32) {
      StreamAvx2(dst, src, n);
    } else {
      StreamSse2(dst, src, n);
    }
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

// Makes streaming stores visible before the kernel returns.
inline void FenceStreams(bool stream) {
#ifdef JAXKV_STREAM_STORES
  if (stream) _mm_sfence();
#else
  (void)stream;
#endif
}

// body(begin, end, stream) over pages [0, k), `stream` saying whether to copy
// with non-temporal stores (the transfer is past the cache): on this thread,
// or halved with a second thread for a large batch. Each half's streaming
// stores are fenced on the thread that made them. `group`: how many kernels
// of one transfer copy a batch like this one (a sharded cache's load runs one
// per device); streaming is chosen from the whole transfer's bytes, which
// pass through the one L3 whatever order the kernels run in. XLA:CPU runs a
// program's device kernels at once, so a group that already fills the cores
// adds no second thread (TP 4 on 2 cores: 0.90-1.18x of np.copyto without,
// 0.85-1.07x with; docs/benchmarks.md, "The copy policy on a smaller L3").
template <typename Body>
void ForPages(int64_t k, size_t batch_bytes, Body body, int64_t group = 1) {
  EnsurePolicy();
  const int64_t batch = static_cast<int64_t>(batch_bytes);
  if (group < 1) group = 1;
  const bool stream = batch * group >= g_stream_min_bytes.load(std::memory_order_relaxed);
  const bool may_split = group < g_cores.load(std::memory_order_relaxed);
  auto run = [&body, stream](int64_t begin, int64_t end) {
    body(begin, end, stream);
    FenceStreams(stream);
  };
  g_batches.fetch_add(1, std::memory_order_relaxed);
#ifdef JAXKV_STREAM_STORES
  if (stream) {
    g_streamed_batches.fetch_add(1, std::memory_order_relaxed);
    g_streamed_bytes.fetch_add(batch, std::memory_order_relaxed);
  }
#endif
  if (k < 2 || !may_split || batch < g_split_min_bytes.load(std::memory_order_relaxed)) {
    run(int64_t{0}, k);
    return;
  }
  g_split_batches.fetch_add(1, std::memory_order_relaxed);
  const int64_t half = k / 2;
  std::thread other([&run, half, k] { run(half, k); });
  run(int64_t{0}, half);
  other.join();
}

// One page to move: where its bytes go and where they come from.
struct PageMove {
  uint8_t* dst;
  const uint8_t* src;
};

// Copies every move (`page_bytes` each) under the copy policy. Callers list
// only the pages that really move, so bucket padding neither tips a batch past
// a threshold nor leaves the second thread a half of padding while the first
// copies real pages (a 96-page load padded to 128 split 64 / 32).
void MovePages(const std::vector<PageMove>& moves, size_t page_bytes, int64_t group = 1) {
  const int64_t n = static_cast<int64_t>(moves.size());
  if (n == 0) return;
  ForPages(
      n, static_cast<size_t>(n) * page_bytes,
      [&](int64_t begin, int64_t end, bool stream) {
        for (int64_t i = begin; i < end; ++i) CopyPage(moves[i].dst, moves[i].src, page_bytes, stream);
      },
      group);
}

// Bytes of one page of `cache` ([num_pages, ...]).
size_t PageBytes(const ffi::AnyBuffer& cache) {
  auto dims = cache.dimensions();
  if (dims.size() == 0 || dims[0] == 0) return 0;
  return cache.size_bytes() / static_cast<size_t>(dims[0]);
}

// rows[i] = bytes of page ids[i]; ids outside [0, num_pages) give zero rows.
ffi::Error PageGather(ffi::AnyBuffer cache, ffi::Buffer<ffi::S32> ids,
                      ffi::ResultBuffer<ffi::U8> rows) {
  const int64_t num_pages = cache.dimensions()[0];
  const size_t page_bytes = PageBytes(cache);
  const int64_t k = static_cast<int64_t>(ids.element_count());
  auto rdims = rows->dimensions();
  if (rdims.size() != 2 || rdims[0] != k ||
      static_cast<size_t>(rdims[1]) != page_bytes) {
    return ffi::Error::InvalidArgument("jaxkv_page_gather: rows must be [len(ids), page_bytes]");
  }
  const auto* src = static_cast<const uint8_t*>(cache.untyped_data());
  auto* dst = rows->typed_data();
  const int32_t* id = ids.typed_data();
  ForPages(k, k * page_bytes, [&](int64_t begin, int64_t end, bool stream) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = id[i];
      if (p < 0 || p >= num_pages) {
        std::memset(dst + i * page_bytes, 0, page_bytes);
      } else {
        CopyPage(dst + i * page_bytes, src + p * page_bytes, page_bytes, stream);
      }
    }
  });
  return ffi::Error::Success();
}

// out = cache with page ids[i] replaced by rows[i]; ids outside
// [0, num_pages) are skipped (bucket padding). `out` aliases `cache` when the
// caller donates it, making the update in place.
ffi::Error PageScatter(ffi::AnyBuffer cache, ffi::Buffer<ffi::S32> ids,
                       ffi::Buffer<ffi::U8> rows, ffi::Result<ffi::AnyBuffer> out) {
  const int64_t num_pages = cache.dimensions()[0];
  const size_t page_bytes = PageBytes(cache);
  const int64_t k = static_cast<int64_t>(ids.element_count());
  auto rdims = rows.dimensions();
  if (rdims.size() != 2 || rdims[0] != k ||
      static_cast<size_t>(rdims[1]) != page_bytes) {
    return ffi::Error::InvalidArgument("jaxkv_page_scatter: rows must be [len(ids), page_bytes]");
  }
  auto* dst = static_cast<uint8_t*>(out->untyped_data());
  const auto* src = static_cast<const uint8_t*>(cache.untyped_data());
  if (dst != src) std::memcpy(dst, src, cache.size_bytes());  // not donated: copy first
  const uint8_t* r = rows.typed_data();
  const int32_t* id = ids.typed_data();
  std::vector<PageMove> moves;
  moves.reserve(k);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t p = id[i];
    if (p < 0 || p >= num_pages) continue;
    moves.push_back({dst + p * page_bytes, r + i * page_bytes});
  }
  MovePages(moves, page_bytes);
  return ffi::Error::Success();
}

// Like PageScatter, but page ids[i] comes from bytes [offset, offset + page_bytes)
// of row slots[i] of `pool` ([num_rows, row_bytes]): a host page pool whose rows
// hold one page of several shards side by side. Reading straight from the pool
// saves the staging copy.
ffi::Error PageScatterFromPool(ffi::AnyBuffer cache, ffi::Buffer<ffi::S32> ids,
                               ffi::Buffer<ffi::U8> pool, ffi::Buffer<ffi::S32> slots,
                               ffi::Buffer<ffi::S32> offset, ffi::Result<ffi::AnyBuffer> out, int64_t group) {
  const int64_t num_pages = cache.dimensions()[0];
  const size_t page_bytes = PageBytes(cache);
  const int64_t k = static_cast<int64_t>(ids.element_count());
  auto pdims = pool.dimensions();
  if (pdims.size() != 2 || static_cast<int64_t>(slots.element_count()) != k ||
      offset.element_count() != 1) {
    return ffi::Error::InvalidArgument("jaxkv_page_scatter_from_pool: bad pool/slots/offset shapes");
  }
  const int64_t num_rows = pdims[0];
  const size_t row_bytes = static_cast<size_t>(pdims[1]);
  const int64_t off = offset.typed_data()[0];
  if (off < 0 || static_cast<size_t>(off) + page_bytes > row_bytes) {
    return ffi::Error::InvalidArgument("jaxkv_page_scatter_from_pool: offset + page_bytes exceeds row_bytes");
  }
  auto* dst = static_cast<uint8_t*>(out->untyped_data());
  const auto* src = static_cast<const uint8_t*>(cache.untyped_data());
  if (dst != src) std::memcpy(dst, src, cache.size_bytes());
  const uint8_t* rows = pool.typed_data();
  const int32_t* id = ids.typed_data();
  const int32_t* slot = slots.typed_data();
  std::vector<PageMove> moves;
  moves.reserve(k);
  for (int64_t i = 0; i < k; ++i) {
    const int64_t p = id[i];
    const int64_t s = slot[i];
    if (p < 0 || p >= num_pages || s < 0 || s >= num_rows) continue;
    moves.push_back({dst + p * page_bytes, rows + s * row_bytes + off});
  }
  MovePages(moves, page_bytes, group);
  return ffi::Error::Success();
}

// out = cache ([num_pages, kv_dim, layers, page_size, heads, dim], any dtype)
// with tokens[i, kv] (the bytes of one token's [heads, dim] for K or V) at
// (pages[i], kv, layer, slots[i]). Tokens whose page is outside
// [0, num_pages) are dropped (padding). `out` aliases `cache` when the caller
// donates it: paged attention's write then costs O(tokens), not O(cache).
ffi::Error TokenScatter(ffi::AnyBuffer cache, ffi::Buffer<ffi::S32> pages, ffi::Buffer<ffi::S32> slots,
                        ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::U8> tokens,
                        ffi::Result<ffi::AnyBuffer> out) {
  auto dims = cache.dimensions();
  if (dims.size() != 6) return ffi::Error::InvalidArgument("jaxkv_token_scatter: cache must be 6-D");
  const int64_t num_pages = dims[0], kv_dim = dims[1], layers = dims[2], page_size = dims[3];
  const size_t row = cache.size_bytes() / (num_pages * kv_dim * layers * page_size);  // one token's heads x dim
  const int64_t n = static_cast<int64_t>(pages.element_count());
  auto tdims = tokens.dimensions();
  if (static_cast<int64_t>(slots.element_count()) != n || layer.element_count() != 1 || tdims.size() != 3 ||
      tdims[0] != n || tdims[1] != kv_dim || static_cast<size_t>(tdims[2]) != row) {
    return ffi::Error::InvalidArgument("jaxkv_token_scatter: tokens must be [len(pages), kv_dim, token bytes]");
  }
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= layers) return ffi::Error::InvalidArgument("jaxkv_token_scatter: layer out of range");
  auto* dst = static_cast<uint8_t*>(out->untyped_data());
  const auto* src = static_cast<const uint8_t*>(cache.untyped_data());
  if (dst != src) std::memcpy(dst, src, cache.size_bytes());  // not donated: copy first
  const uint8_t* t = tokens.typed_data();
  const int32_t* page = pages.typed_data();
  const int32_t* slot = slots.typed_data();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t p = page[i], s = slot[i];
    if (p < 0 || p >= num_pages || s < 0 || s >= page_size) continue;
    for (int64_t kv = 0; kv < kv_dim; ++kv) {
      const size_t at = (((static_cast<size_t>(p) * kv_dim + kv) * layers + l) * page_size + s) * row;
      std::memcpy(dst + at, t + (static_cast<size_t>(i) * kv_dim + kv) * row, row);
    }
  }
  return ffi::Error::Success();
}

// done[0] = 1, once `array` exists: a marker that a write into `array` ended.
// A custom call reads no byte of `array`; on XLA:CPU even a one-element slice
// of a just-written cache ran as a fusion costing ~1 ms per 24 MiB load
// (docs/benchmarks.md, "The copy policy on a smaller L3").
ffi::Error Done(ffi::AnyBuffer array, ffi::ResultBuffer<ffi::U8> done) {
  (void)array;
  done->typed_data()[0] = 1;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxkv_done, Done,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::Buffer<ffi::U8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxkv_token_scatter, TokenScatter,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxkv_page_gather, PageGather,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxkv_page_scatter, PageScatter,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxkv_page_scatter_from_pool, PageScatterFromPool,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("group"));

// Plain C entry point (called through ctypes, not XLA): for i < k, copy
// `nbytes` from row src_rows[i] of `src` to row dst_rows[i] of `dst` (rows
// `*_stride` bytes apart, `*_num_rows` of them). The host offload path uses it
// to move pages between a CPU shard and the host pool without a Python-level
// loop per page. Every row is checked before any byte moves: returns -1 when
// all were copied, or the first i whose dst_rows[i] or src_rows[i] lies outside
// its array (nothing copied).
extern "C" int64_t jaxkv_copy_rows(uint8_t* dst, int64_t dst_stride, int64_t dst_num_rows,
                                   const uint8_t* src, int64_t src_stride, int64_t src_num_rows,
                                   int64_t nbytes, const int32_t* dst_rows,
                                   const int32_t* src_rows, int64_t k) {
  for (int64_t i = 0; i < k; ++i) {
    if (dst_rows[i] < 0 || dst_rows[i] >= dst_num_rows || src_rows[i] < 0 ||
        src_rows[i] >= src_num_rows) {
      return i;
    }
  }
  ForPages(k, static_cast<size_t>(k) * static_cast<size_t>(nbytes), [&](int64_t begin, int64_t end, bool stream) {
    for (int64_t i = begin; i < end; ++i) {
      CopyPage(dst + dst_rows[i] * dst_stride, src + src_rows[i] * src_stride, static_cast<size_t>(nbytes), stream);
    }
  });
  return -1;
}

// Plain C entry point: for i < n, copy sizes[i] bytes from src[i] to dst[i],
// all as one batch under the copy policy. The caller computed the addresses
// from arrays it holds and checked them: the D2H of a sharded cache moves
// every shard's pages in one batch, so the policy sees what the whole
// transfer touches (at TP 4 a 16 MiB transfer is four 4 MiB batches, each
// under the streaming threshold on its own) and both threads share it.
extern "C" void jaxkv_copy_pages(uint8_t* const* dst, const uint8_t* const* src, const int64_t* sizes, int64_t n) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += sizes[i];
  if (n == 0) return;
  ForPages(n, static_cast<size_t>(total), [&](int64_t begin, int64_t end, bool stream) {
    for (int64_t i = begin; i < end; ++i) CopyPage(dst[i], src[i], static_cast<size_t>(sizes[i]), stream);
  });
}

namespace {

// Transpose a `[rows, cols]` matrix of `chunk`-byte elements into `[cols, rows]`
// (the stored form of a row's units: `[units, kv*layers*tokens, heads*dim]` ->
// `[kv*layers*tokens, units, heads*dim]`, MAX's TP-1 page, and back with rows
// and cols swapped). Chunks are hundreds of bytes to KiB: they move with
// inlined vector loads and stores, since a call to memcpy per chunk costs as
// much as its bytes. `Chunk` copies one; the loop is the same for every width.
#define JAXKV_TRANSPOSE_LOOP(Chunk)                                \
  for (int64_t r = 0; r < rows; ++r) {                             \
    const uint8_t* from = src + static_cast<size_t>(r) * cols * n; \
    for (int64_t c = 0; c < cols; ++c) {                           \
      Chunk(dst + (static_cast<size_t>(c) * rows + r) * n, from + c * n, n); \
    }                                                              \
  }

inline void MemcpyChunk(uint8_t* dst, const uint8_t* src, size_t n) { std::memcpy(dst, src, n); }

void TransposeMemcpy(uint8_t* dst, const uint8_t* src, int64_t rows, int64_t cols, size_t n) {
  JAXKV_TRANSPOSE_LOOP(MemcpyChunk)
}

#ifdef JAXKV_STREAM_STORES
__attribute__((target("avx2"))) inline void Avx2Chunk(uint8_t* dst, const uint8_t* src, size_t n) {
  for (size_t i = 0; i < n; i += 32) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
  }
}

// For chunks of a multiple of 32 bytes on a CPU with AVX2.
__attribute__((target("avx2"))) void TransposeAvx2(uint8_t* dst, const uint8_t* src, int64_t rows, int64_t cols,
                                                   size_t n) {
  JAXKV_TRANSPOSE_LOOP(Avx2Chunk)
}
#endif

}  // namespace

// Plain C entry point (ctypes): `dst[c][r] = src[r][c]` for a `[rows, cols]`
// matrix of `chunk`-byte elements; the stored (TP-independent) form of a row
// and back. One pass; the caller checks sizes (both rows * cols * chunk bytes,
// not overlapping).
extern "C" void jaxkv_transpose_chunks(uint8_t* dst, const uint8_t* src, int64_t rows, int64_t cols,
                                       int64_t chunk) {
  const size_t n = static_cast<size_t>(chunk);
#ifdef JAXKV_STREAM_STORES
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2 && n % 32 == 0) {
    TransposeAvx2(dst, src, rows, cols, n);
    return;
  }
#endif
  TransposeMemcpy(dst, src, rows, cols, n);
}

// Plain C entry points (ctypes) for the copy policy. out: {l3_bytes, cores,
// stream_min_bytes, split_min_bytes, store_bytes}; INT64_MAX means never.

// The policy for an L3 of `l3_bytes`, `cores` and a CPU whose widest
// streaming store is `widest_store` bytes, with `spec`'s overrides (a pure
// function: nothing changes). Returns 0, or 1 + the offset of the bad entry.
extern "C" int jaxkv_copy_policy_choose(const char* spec, int64_t l3_bytes, int64_t cores, int64_t widest_store,
                                        int64_t* out) {
  CopyPolicy p;
  const int bad = ChoosePolicy(spec, l3_bytes, cores, widest_store, &p);
  if (bad == 0) {
    out[0] = p.l3_bytes, out[1] = p.cores, out[2] = p.stream_min_bytes, out[3] = p.split_min_bytes;
    out[4] = p.store_bytes;
  }
  return bad;
}

// The policy the kernels use now.
extern "C" void jaxkv_copy_policy_current(int64_t* out) {
  EnsurePolicy();
  std::lock_guard<std::mutex> lock(g_policy_mutex);
  out[0] = g_policy.l3_bytes, out[1] = g_policy.cores;
  out[2] = g_policy.stream_min_bytes, out[3] = g_policy.split_min_bytes, out[4] = g_policy.store_bytes;
}

// Batches copied so far, of which streamed (and their bytes) and split over two threads.
extern "C" void jaxkv_copy_stats(int64_t* out) {
  out[0] = g_batches.load(), out[1] = g_streamed_batches.load();
  out[2] = g_streamed_bytes.load(), out[3] = g_split_batches.load();
}

// Rechoose the policy from the machine with `spec`'s overrides (tests and
// benchmarks compare policies in one process). Returns as choose does.
extern "C" int jaxkv_copy_policy_set(const char* spec) {
  EnsurePolicy();
  return SetPolicy(spec);
}
