// Chained block hashes (jaxkv/prefix/hashing.py) through OpenSSL's SHA-256.
//
//   hash[i] = SHA-256(hash[i-1] | block i's token bytes | extra)
//
// The hashing itself is OpenSSL's (it uses the CPU's SHA extensions where
// present); this file only runs the chain, so a whole request costs one call
// from Python instead of one hashlib call per block. hashing.py passes the
// tokens already as little-endian int32 bytes, so the digests are those of
// its hashlib path on any host.
//
// Built by CMakeLists.txt only where OpenSSL's libcrypto is found; without it
// the symbol is absent and hashing.py hashes with hashlib.

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/opensslv.h>

#include <cstdint>
#include <memory>

namespace {

// The SHA-256 implementation, looked up once. OpenSSL 3 looks the algorithm
// up again on every EVP_DigestInit_ex given EVP_sha256(); an explicitly
// fetched one skips that (more than twice the blocks per second:
// docs/benchmarks.md, "Measurements behind the rules", "Block hashing").
const EVP_MD* sha256() {
#if OPENSSL_VERSION_MAJOR >= 3
  static const EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  return md;
#else
  return EVP_sha256();
#endif
}

struct CtxFree {
  void operator()(EVP_MD_CTX* ctx) const { EVP_MD_CTX_free(ctx); }
};

// One context per thread, reused across calls: the ctypes call is the cost
// to keep down when a request has only a few blocks.
EVP_MD_CTX* context() {
  thread_local std::unique_ptr<EVP_MD_CTX, CtxFree> ctx(EVP_MD_CTX_new());
  return ctx.get();
}

}  // namespace

// Hashes `n_blocks` blocks of `block_bytes` bytes each from `tokens`, chained
// from the 32-byte `parent`, with `extra` (`extra_len` bytes, may be null when
// 0) appended to every block. Writes n_blocks * 32 bytes to `out`; block i's
// parent is out[32 * (i - 1)], so `out` must not overlap `parent` or `tokens`.
// Returns 0, or -1 if OpenSSL failed or a count is negative (out is then
// unspecified).
//
// The counts are C ints, not int64_t, so that hashing.py can call without
// ctypes argtypes: ctypes passes Python ints as C int as they are, and
// converting seven declared arguments costs as much as hashing a 128-token
// block (docs/benchmarks.md, "Block hashing"). hashing.py keeps every count
// below 2**31.
extern "C" int jaxkv_hash_blocks(const uint8_t* tokens, int n_blocks, int block_bytes, const uint8_t* parent,
                                 const uint8_t* extra, int extra_len, uint8_t* out) {
  const EVP_MD* md = sha256();
  EVP_MD_CTX* ctx = context();
  if (md == nullptr || ctx == nullptr || n_blocks < 0 || block_bytes < 0 || extra_len < 0) return -1;
  for (int64_t i = 0; i < n_blocks; ++i) {
    uint8_t* digest = out + 32 * i;
    bool ok = EVP_DigestInit_ex(ctx, md, nullptr) == 1 && EVP_DigestUpdate(ctx, parent, 32) == 1 &&
              EVP_DigestUpdate(ctx, tokens + static_cast<int64_t>(block_bytes) * i, block_bytes) == 1 &&
              (extra_len == 0 || EVP_DigestUpdate(ctx, extra, extra_len) == 1) &&
              EVP_DigestFinal_ex(ctx, digest, nullptr) == 1;
    if (!ok) return -1;
    parent = digest;
  }
  return 0;
}

// The libcrypto this library runs with ("OpenSSL 3.0.19 27 Jan 2026"), for
// benchmark conditions.
extern "C" const char* jaxkv_hash_openssl_version() { return OpenSSL_version(OPENSSL_VERSION); }
