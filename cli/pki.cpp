#include "cli/pki.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <openssl/bn.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>

#include "scheduler/rpc/jwt.h"

namespace ablate::cli {
namespace {

namespace fs = std::filesystem;

struct X509Free { void operator()(X509* x) const { X509_free(x); } };
struct PKeyFree { void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); } };
struct BioFree { void operator()(BIO* b) const { BIO_free(b); } };
using X509Ptr = std::unique_ptr<X509, X509Free>;
using PKeyPtr = std::unique_ptr<EVP_PKEY, PKeyFree>;
using BioPtr = std::unique_ptr<BIO, BioFree>;

constexpr long kDay = 86400;
const std::set<std::string> kReserved = {"ca", "scheduler", "user", "admin", "tokens"};

std::string Hex(const unsigned char* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) s += std::string{d[p[i] >> 4], d[p[i] & 15]};
  return s;
}

bool ReadAll(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return true;
}

// tmp + fsync + rename, created 0600 whatever the umask; the tmp name never follows a link.
bool WritePrivate(const std::string& path, const std::string& data, std::string* error) {
  const std::string tmp = path + ".tmp";
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) {
    *error = "cannot create " + tmp + ": " + std::strerror(errno);
    return false;
  }
  ::fchmod(fd, 0600);
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      *error = "cannot write " + tmp + ": " + std::strerror(errno);
      ::close(fd);
      ::unlink(tmp.c_str());
      return false;
    }
    off += static_cast<size_t>(n);
  }
  bool ok = ::fsync(fd) == 0;
  ok = ::close(fd) == 0 && ok;
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    *error = "cannot write " + path + ": " + std::strerror(errno);
    ::unlink(tmp.c_str());
    return false;
  }
  return true;
}

std::string BioString(BIO* b) {
  char* p = nullptr;
  long n = BIO_get_mem_data(b, &p);
  return n > 0 ? std::string(p, static_cast<size_t>(n)) : std::string();
}

std::string KeyPem(EVP_PKEY* k) {
  BioPtr b(BIO_new(BIO_s_mem()));
  if (!b || PEM_write_bio_PrivateKey(b.get(), k, nullptr, nullptr, 0, nullptr, nullptr) != 1) return "";
  std::string s = BioString(b.get());
  char* p = nullptr;
  long n = BIO_get_mem_data(b.get(), &p);
  if (n > 0) OPENSSL_cleanse(p, static_cast<size_t>(n));  // the key's only other copy is `s`
  return s;
}

std::string CertPem(X509* x) {
  BioPtr b(BIO_new(BIO_s_mem()));
  if (!b || PEM_write_bio_X509(b.get(), x) != 1) return "";
  return BioString(b.get());
}

X509Ptr LoadCert(const std::string& path) {
  std::string pem;
  if (!ReadAll(path, &pem)) return nullptr;
  BioPtr b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  return X509Ptr(b ? PEM_read_bio_X509(b.get(), nullptr, nullptr, nullptr) : nullptr);
}

PKeyPtr LoadKey(const std::string& path) {
  std::string pem;
  if (!ReadAll(path, &pem)) return nullptr;
  BioPtr b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  PKeyPtr k(b ? PEM_read_bio_PrivateKey(b.get(), nullptr, nullptr, nullptr) : nullptr);
  OPENSSL_cleanse(pem.data(), pem.size());
  return k;
}

bool LivesAtLeast(X509* x, long seconds) {
  time_t t = std::time(nullptr) + seconds;
  return X509_cmp_time(X509_get0_notAfter(x), &t) > 0;
}

std::string CommonName(X509* x) {
  char buf[256] = {0};
  int n = X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, buf, sizeof buf);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string();
}

// A certificate for `key` with subject CN=cn, signed by (issuer, issuer_key); self-signed when issuer is null.
// Valid from not_before_s (an offset from now; an hour back by default) to `days` from now.
X509Ptr MakeCert(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key, long days,
                 const std::vector<std::pair<int, std::string>>& exts, long not_before_s = -3600) {
  X509Ptr x(X509_new());
  if (!x) return nullptr;
  X509_set_version(x.get(), 2);  // v3
  std::unique_ptr<BIGNUM, decltype(&BN_free)> serial(BN_new(), BN_free);
  if (!serial || BN_rand(serial.get(), 127, BN_RAND_TOP_ANY, BN_RAND_BOTTOM_ODD) != 1 ||
      !BN_to_ASN1_INTEGER(serial.get(), X509_get_serialNumber(x.get())))
    return nullptr;
  X509_gmtime_adj(X509_getm_notBefore(x.get()), not_before_s);  // an hour of clock skew between hosts
  X509_gmtime_adj(X509_getm_notAfter(x.get()), days * kDay);
  X509_set_pubkey(x.get(), key);
  X509_NAME* name = X509_get_subject_name(x.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1,
                             0);
  X509_set_issuer_name(x.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer ? issuer : x.get(), x.get(), nullptr, nullptr, 0);
  for (const auto& [nid, value] : exts) {
    X509_EXTENSION* e = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str());
    if (!e) return nullptr;
    X509_add_ext(x.get(), e, -1);
    X509_EXTENSION_free(e);
  }
  if (X509_sign(x.get(), issuer ? issuer_key : key, EVP_sha256()) <= 0) return nullptr;
  return x;
}

PKeyPtr NewKey() { return PKeyPtr(EVP_EC_gen("prime256v1")); }

bool IsIp(const std::string& s) {
  unsigned char buf[16];
  return ::inet_pton(AF_INET, s.c_str(), buf) == 1 || ::inet_pton(AF_INET6, s.c_str(), buf) == 1;
}

bool HasName(X509* x, const std::string& n) {
  return IsIp(n) ? X509_check_ip_asc(x, n.c_str(), 0) == 1 : X509_check_host(x, n.c_str(), n.size(), 0, nullptr) == 1;
}

struct Ca {
  X509Ptr cert;
  PKeyPtr key;
};

// Keeps a leaf (cert + key) that this CA signed, for this CN and these names, with a day left; else makes one.
bool EnsureLeaf(const std::string& dir, const std::string& file, const std::string& cn, bool server,
                const std::vector<std::string>& names, const Ca& ca, bool force, int days, PkiReport* rep,
                std::string* error) {
  const std::string cert_path = dir + "/" + file + ".pem", key_path = dir + "/" + file + "-key.pem";
  if (!force) {
    X509Ptr cert = LoadCert(cert_path);
    PKeyPtr key = LoadKey(key_path);
    bool good = cert && key && X509_verify(cert.get(), X509_get0_pubkey(ca.cert.get())) == 1 &&
                X509_check_private_key(cert.get(), key.get()) == 1 && CommonName(cert.get()) == cn &&
                LivesAtLeast(cert.get(), kDay);
    for (const auto& n : names) good = good && HasName(cert.get(), n);
    if (good) {
      ::chmod(cert_path.c_str(), 0600);
      ::chmod(key_path.c_str(), 0600);
      rep->kept.push_back(file + ".pem");
      return true;
    }
  }
  PKeyPtr key = NewKey();
  if (!key) {
    *error = "cannot generate a key for " + file;
    return false;
  }
  std::vector<std::pair<int, std::string>> exts = {
      {NID_basic_constraints, "critical,CA:FALSE"},
      {NID_key_usage, "critical,digitalSignature"},
      {NID_ext_key_usage, server ? "serverAuth" : "clientAuth"},
      {NID_subject_key_identifier, "hash"},
      {NID_authority_key_identifier, "keyid:always"}};
  if (!names.empty()) {
    std::string san;
    for (const auto& n : names) san += (san.empty() ? "" : ",") + std::string(IsIp(n) ? "IP:" : "DNS:") + n;
    exts.push_back({NID_subject_alt_name, san});
  }
  // days < 0: an already expired certificate (valid for one day, ending |days| days ago).
  X509Ptr cert = MakeCert(key.get(), cn, ca.cert.get(), ca.key.get(), days, exts,
                          days > 0 ? -3600 : (static_cast<long>(days) - 1) * kDay);
  std::string key_pem = key ? KeyPem(key.get()) : "";
  if (!cert || key_pem.empty()) {
    *error = "cannot issue the certificate " + file + ".pem";
    return false;
  }
  bool ok = WritePrivate(key_path, key_pem, error) && WritePrivate(cert_path, CertPem(cert.get()), error);
  OPENSSL_cleanse(key_pem.data(), key_pem.size());
  if (ok) rep->made.push_back(file + ".pem");
  return ok;
}

std::string NewToken() {
  unsigned char b[32];
  if (RAND_bytes(b, sizeof b) != 1) return "";
  return Hex(b, sizeof b);
}

// The first line of a token file, when it looks like one of ours (printable, no blanks, 16+ characters).
std::string ReadToken(const std::string& path) {
  std::string all;
  if (!ReadAll(path, &all)) return "";
  std::string t = all.substr(0, all.find('\n'));
  while (!t.empty() && (t.back() == '\r' || t.back() == ' ')) t.pop_back();
  if (t.size() < 16) return "";
  for (unsigned char c : t)
    if (c <= 0x20 || c >= 0x7f) return "";
  return t;
}

std::string TokenDigestHex(const std::string& token) {
  unsigned char d[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(token.data()), token.size(), d);
  return Hex(d, sizeof d);
}

}  // namespace

bool WritePrivateFile(const std::string& path, const std::string& data, std::string* error) {
  return WritePrivate(path, data, error);
}

bool ValidPkiWorkerId(const std::string& id, std::string* why) {
  if (id.empty() || id.size() > 128) {
    *why = "worker id '" + id + "': 1 to 128 characters";
    return false;
  }
  auto ok = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'; };
  if (!std::isalnum(static_cast<unsigned char>(id[0])) || !std::all_of(id.begin(), id.end(), ok)) {
    *why = "worker id '" + id + "': letters, digits, '.', '_' and '-' only, starting with a letter or digit";
    return false;
  }
  if (kReserved.count(id)) {
    *why = "worker id '" + id + "' is reserved (its files would clash with the CA, scheduler or people's tokens)";
    return false;
  }
  return true;
}

bool EnsurePki(const std::string& dir, const PkiOptions& opts, PkiReport* rep, std::string* error) {
  std::vector<std::string> workers;
  bool renew_scheduler = false;
  std::set<std::string> renew;
  for (const auto& r : opts.renew) {
    if (r == "scheduler") {
      renew_scheduler = true;
      continue;
    }
    if (!ValidPkiWorkerId(r, error)) return false;
    renew.insert(r);
  }
  if (opts.leaf_days == 0 || opts.leaf_days > 3650 || opts.leaf_days < -3650) {
    *error = "leaf validity: 1 to 3650 days, or a negative number of days for an already expired certificate";
    return false;
  }
  std::vector<std::string> all = opts.workers;
  all.insert(all.end(), opts.renew.begin(), opts.renew.end());
  for (const auto& w : all) {
    if (w == "scheduler" && !std::count(opts.workers.begin(), opts.workers.end(), w)) continue;
    if (!ValidPkiWorkerId(w, error)) return false;
    if (std::find(workers.begin(), workers.end(), w) == workers.end()) workers.push_back(w);
  }
  std::vector<std::string> names = {"localhost", "127.0.0.1", "::1"};
  for (const auto& n : opts.scheduler_names) {
    bool ok = !n.empty() && n.size() <= 253 && std::all_of(n.begin(), n.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == ':' || c == '*';
    });
    if (!ok) {
      *error = "scheduler name '" + n + "': a DNS name or an IP address";
      return false;
    }
    if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || ::chmod(dir.c_str(), 0700) != 0) {
    *error = "cannot create " + dir + ": " + (ec ? ec.message() : std::string(std::strerror(errno)));
    return false;
  }

  // The CA: kept while its key matches and it has 30 days left; a new one re-issues every leaf.
  Ca ca;
  ca.cert = LoadCert(dir + "/ca.pem");
  ca.key = LoadKey(dir + "/ca-key.pem");
  bool new_ca = !(ca.cert && ca.key && X509_check_private_key(ca.cert.get(), ca.key.get()) == 1 &&
                  LivesAtLeast(ca.cert.get(), 30 * kDay));
  if (new_ca) {
    ca.key = NewKey();
    ca.cert = ca.key ? MakeCert(ca.key.get(), "ablate-local-ca", nullptr, nullptr, 3650,
                                {{NID_basic_constraints, "critical,CA:TRUE,pathlen:0"},
                                 {NID_key_usage, "critical,keyCertSign,cRLSign"},
                                 {NID_subject_key_identifier, "hash"}})
                     : nullptr;
    std::string key_pem = ca.cert ? KeyPem(ca.key.get()) : "";
    if (key_pem.empty()) {
      *error = "cannot make the CA";
      return false;
    }
    bool ok = WritePrivate(dir + "/ca-key.pem", key_pem, error) &&
              WritePrivate(dir + "/ca.pem", CertPem(ca.cert.get()), error);
    OPENSSL_cleanse(key_pem.data(), key_pem.size());
    if (!ok) return false;
    rep->made.push_back("ca.pem");
  } else {
    ::chmod((dir + "/ca.pem").c_str(), 0600);
    ::chmod((dir + "/ca-key.pem").c_str(), 0600);
    rep->kept.push_back("ca.pem");
  }

  if (!EnsureLeaf(dir, "scheduler", "localhost", true, names, ca, new_ca || renew_scheduler, opts.leaf_days, rep,
                  error))
    return false;
  for (const auto& w : workers)
    if (!EnsureLeaf(dir, w, w, false, {}, ca, new_ca || renew.count(w) > 0, opts.leaf_days, rep, error)) return false;

  // The key that signs short-lived bearer tokens (scheduler --token_signing_key_file); kept while it parses.
  {
    const std::string path = dir + "/token-signing.key";
    std::vector<std::string> keys;
    std::string warning, why;
    if (jwt::ReadKeyFile(path, &keys, &warning, &why)) {
      ::chmod(path.c_str(), 0600);
      rep->kept.push_back("token-signing.key");
    } else {
      std::string key = jwt::NewKeyFileContent();
      bool ok = !key.empty() && WritePrivate(path, key, error);
      OPENSSL_cleanse(key.data(), key.size());
      if (!ok) {
        if (error->empty()) *error = "cannot make a random token signing key";
        return false;
      }
      rep->made.push_back("token-signing.key");
    }
  }

  // Tokens: people's and one per worker; an existing good one is kept.
  std::vector<std::string> token_names = {"user", "admin"};
  token_names.insert(token_names.end(), workers.begin(), workers.end());
  for (const auto& n : token_names) {
    const std::string path = dir + "/" + n + ".token";
    std::string t = ReadToken(path);
    if (!t.empty()) {
      ::chmod(path.c_str(), 0600);
      rep->kept.push_back(n + ".token");
      continue;
    }
    t = NewToken();
    if (t.empty() || !WritePrivate(path, t + "\n", error)) {
      if (error->empty()) *error = "cannot make a random token";
      return false;
    }
    OPENSSL_cleanse(t.data(), t.size());
    rep->made.push_back(n + ".token");
  }

  // The scheduler's --tokens_file, from every *.token here (workers of earlier runs included), digests only.
  std::map<std::string, std::string> lines;  // sorted by name: stable content
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string f = e.path().filename().string();
    if (f.size() <= 6 || f.compare(f.size() - 6, 6, ".token") != 0) continue;
    const std::string name = f.substr(0, f.size() - 6);
    std::string why, role;
    if (name == "user") role = "user";
    else if (name == "admin") role = "admin";
    else if (ValidPkiWorkerId(name, &why)) role = "worker";
    else continue;
    std::string t = ReadToken(e.path().string());
    if (t.empty()) continue;
    lines[name] = role + " " + (role == "worker" ? name : "local-" + name) + " sha256:" + TokenDigestHex(t);
    OPENSSL_cleanse(t.data(), t.size());
  }
  std::string content =
      "# ablate-scheduler --tokens_file, written by `ablate certs` / `ablate up` from the *.token files here\n"
      "# <role> <name> sha256:<digest of the token>; a worker's name is its worker id\n";
  for (const auto& [n, l] : lines) content += l + "\n";
  std::string old;
  if (ReadAll(dir + "/tokens", &old) && old == content) {
    ::chmod((dir + "/tokens").c_str(), 0600);
    rep->kept.push_back("tokens");
  } else {
    if (!WritePrivate(dir + "/tokens", content, error)) return false;
    rep->made.push_back("tokens");
  }
  return true;
}

}  // namespace ablate::cli
