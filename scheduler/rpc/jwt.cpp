#include "scheduler/rpc/jwt.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/stat.h>

#include <cctype>
#include <chrono>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace ablate::jwt {
namespace {

constexpr char kAlphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

int Sextet(char c) {
  if (c >= 'A' && c <= 'Z') return c - 'A';
  if (c >= 'a' && c <= 'z') return c - 'a' + 26;
  if (c >= '0' && c <= '9') return c - '0' + 52;
  if (c == '-') return 62;
  if (c == '_') return 63;
  return -1;
}

std::string Hmac(std::string_view key, std::string_view data) {
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(data.data()),
            data.size(), mac, &len)) {
    return "";
  }
  std::string out(reinterpret_cast<const char*>(mac), len);
  OPENSSL_cleanse(mac, sizeof mac);
  return out;
}

std::string Hex(const unsigned char* p, size_t n) {
  static const char* d = "0123456789abcdef";
  std::string s;
  s.reserve(2 * n);
  for (size_t i = 0; i < n; ++i) {
    s += d[p[i] >> 4];
    s += d[p[i] & 15];
  }
  return s;
}

// A claim that must be a short printable string without blanks or control characters.
bool Text(const nlohmann::json& j, const char* name, bool required, size_t max, std::string* out) {
  auto it = j.find(name);
  if (it == j.end()) return !required;
  if (!it->is_string()) return false;
  const std::string& s = it->get_ref<const std::string&>();
  if (s.empty() || s.size() > max) return false;
  for (unsigned char c : s)
    if (c < 0x20 || c == 0x7f) return false;
  *out = s;
  return true;
}

// A NumericDate: an integer number of seconds (RFC 7519 allows fractions; we issue and accept integers only).
bool Time(const nlohmann::json& j, const char* name, bool required, int64_t* out) {
  auto it = j.find(name);
  if (it == j.end()) return !required;
  if (it->is_number_unsigned()) {
    uint64_t v = it->get<uint64_t>();
    if (v > static_cast<uint64_t>(INT64_MAX)) return false;
    *out = static_cast<int64_t>(v);
    return true;
  }
  if (it->is_number_integer()) {
    *out = it->get<int64_t>();
    return *out >= 0;
  }
  return false;
}

}  // namespace

std::string Base64UrlEncode(std::string_view in) {
  std::string out;
  out.reserve((in.size() * 4 + 2) / 3);
  size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    uint32_t v = (uint32_t(uint8_t(in[i])) << 16) | (uint32_t(uint8_t(in[i + 1])) << 8) | uint8_t(in[i + 2]);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
    out += kAlphabet[v & 63];
  }
  if (in.size() - i == 1) {
    uint32_t v = uint32_t(uint8_t(in[i])) << 16;
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
  } else if (in.size() - i == 2) {
    uint32_t v = (uint32_t(uint8_t(in[i])) << 16) | (uint32_t(uint8_t(in[i + 1])) << 8);
    out += kAlphabet[(v >> 18) & 63];
    out += kAlphabet[(v >> 12) & 63];
    out += kAlphabet[(v >> 6) & 63];
  }
  return out;
}

bool Base64UrlDecode(std::string_view in, std::string* out) {
  out->clear();
  if (in.size() % 4 == 1) return false;
  out->reserve(in.size() * 3 / 4);
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    int v = Sextet(c);
    if (v < 0) return false;
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out->push_back(static_cast<char>((acc >> bits) & 0xff));
    }
  }
  // The leftover bits (2 or 4) must be zero: one encoding per byte string.
  return (acc & ((1u << bits) - 1)) == 0;
}

std::string Sign(const Claims& c, std::string_view key) {
  nlohmann::ordered_json payload = {{"sub", c.sub}, {"tenant", c.tenant}, {"role", c.role},
                                    {"iat", c.iat}, {"nbf", c.nbf},       {"exp", c.exp},
                                    {"jti", c.jti}};
  const std::string signing_input = Base64UrlEncode(R"({"alg":"HS256","typ":"JWT"})") + "." +
                                    Base64UrlEncode(payload.dump());
  return signing_input + "." + Base64UrlEncode(Hmac(key, signing_input));
}

bool LooksLikeJws(std::string_view token) {
  auto a = token.find('.');
  return a != std::string_view::npos && token.find('.', a + 1) != std::string_view::npos;
}

Error Verify(std::string_view token, const std::vector<std::string>& keys, int64_t now_s, int leeway_s, Claims* out,
             std::string* why) {
  auto malformed = [&](const char* what) {
    *why = std::string("malformed token: ") + what;
    return Error::kMalformed;
  };
  if (token.size() > kMaxTokenBytes) return malformed("longer than 4096 bytes");
  const size_t d1 = token.find('.');
  const size_t d2 = d1 == std::string_view::npos ? d1 : token.find('.', d1 + 1);
  if (d2 == std::string_view::npos || token.find('.', d2 + 1) != std::string_view::npos) {
    return malformed("expected header.payload.signature");
  }
  std::string header_json, payload_json, sig;
  if (d1 == 0 || d2 == d1 + 1 || !Base64UrlDecode(token.substr(0, d1), &header_json) ||
      !Base64UrlDecode(token.substr(d1 + 1, d2 - d1 - 1), &payload_json) ||
      !Base64UrlDecode(token.substr(d2 + 1), &sig)) {
    return malformed("not base64url");
  }
  auto header = nlohmann::json::parse(header_json, nullptr, false);
  if (header.is_discarded() || !header.is_object()) return malformed("the header is not a JSON object");
  auto alg = header.find("alg");
  if (alg == header.end() || !alg->is_string() || alg->get_ref<const std::string&>() != "HS256") {
    *why = "unsupported token algorithm (only HS256 is accepted)";
    return Error::kAlgorithm;
  }
  if (header.contains("crit")) {
    *why = "unsupported token header (crit)";
    return Error::kAlgorithm;
  }
  if (auto typ = header.find("typ"); typ != header.end() && (!typ->is_string() || typ->get_ref<const std::string&>() != "JWT")) {
    return malformed("typ is not JWT");
  }
  // The signature first: nothing of an unsigned payload is looked at (or reported).
  bool signed_ok = false;
  if (sig.size() == 32) {
    const std::string_view signing_input = token.substr(0, d2);
    for (const auto& k : keys) {
      std::string mac = Hmac(k, signing_input);
      if (mac.size() == sig.size() && CRYPTO_memcmp(mac.data(), sig.data(), sig.size()) == 0) signed_ok = true;
    }
  }
  if (!signed_ok) {
    *why = "invalid token signature";
    return Error::kSignature;
  }
  auto payload = nlohmann::json::parse(payload_json, nullptr, false);
  if (payload.is_discarded() || !payload.is_object()) return malformed("the payload is not a JSON object");
  Claims c;
  if (!Text(payload, "sub", true, 128, &c.sub) || !Text(payload, "role", true, 16, &c.role) ||
      !Text(payload, "tenant", true, 128, &c.tenant) || !Text(payload, "jti", true, 128, &c.jti) ||
      !Time(payload, "exp", true, &c.exp) || !Time(payload, "nbf", false, &c.nbf) ||
      !Time(payload, "iat", false, &c.iat)) {
    *why = "token claims: sub, role, tenant, jti (strings) and exp (integer) are required; nbf, iat integers";
    return Error::kClaims;
  }
  if (c.role != "user" && c.role != "admin" && c.role != "worker") {
    *why = "token claims: role must be user, admin or worker";
    return Error::kClaims;
  }
  if (now_s >= c.exp + leeway_s) {
    *why = "token expired";
    return Error::kExpired;
  }
  if (now_s + leeway_s < c.nbf || now_s + leeway_s < c.iat) {
    *why = "token not yet valid";
    return Error::kNotYetValid;
  }
  *out = std::move(c);
  why->clear();
  return Error::kOk;
}

bool NewJti(std::string* out) {
  unsigned char b[16];
  if (RAND_bytes(b, sizeof b) != 1) return false;
  *out = Hex(b, sizeof b);
  return true;
}

bool ParseKeyFile(const std::string& content, std::vector<std::string>* keys, std::string* error) {
  std::vector<std::string> found;
  std::stringstream in(content);
  int n = 0;
  for (std::string line; std::getline(in, line);) {
    ++n;
    auto blank = [](char c) { return c == ' ' || c == '\t' || c == '\r'; };
    while (!line.empty() && blank(line.back())) line.pop_back();
    size_t b = 0;
    while (b < line.size() && blank(line[b])) ++b;
    line.erase(0, b);
    if (line.empty() || line[0] == '#') continue;
    for (unsigned char c : line) {
      if (c <= 0x20 || c >= 0x7f) {
        *error = "line " + std::to_string(n) + ": a key must be printable, without blanks (e.g. 64 hex digits)";
        return false;
      }
    }
    if (line.size() < kMinKeyBytes) {
      *error = "line " + std::to_string(n) + ": a key must be at least " + std::to_string(kMinKeyBytes) +
               " bytes (`ablate token keygen` writes 32 random bytes as 64 hex digits)";
      return false;
    }
    found.push_back(std::move(line));
  }
  if (found.empty()) {
    *error = "no key in the file";
    return false;
  }
  *keys = std::move(found);
  return true;
}

bool ReadKeyFile(const std::string& path, std::vector<std::string>* keys, std::string* warning, std::string* error) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    *error = path + ": not a readable file";
    return false;
  }
  if (st.st_size > 64 * 1024) {
    *error = path + ": larger than 64 KiB (not a key file?)";
    return false;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = path + ": cannot read";
    return false;
  }
  std::stringstream ss;
  ss << in.rdbuf();
  std::string content = ss.str();
  std::string why;
  bool ok = ParseKeyFile(content, keys, &why);
  OPENSSL_cleanse(content.data(), content.size());
  if (!ok) {
    *error = path + ": " + why;
    return false;
  }
  if (st.st_mode & (S_IRWXG | S_IRWXO)) *warning = path + " is readable by group or others (chmod 600 it)";
  return true;
}

bool ReadTokenFile(const std::string& path, std::string* token, std::string* warning, std::string* error) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    *error = path + ": not a readable file";
    return false;
  }
  if (st.st_size > 4096) {
    *error = path + ": larger than 4 KiB (not a token file?)";
    return false;
  }
  std::ifstream in(path, std::ios::binary);
  std::string line;
  if (!in || !std::getline(in, line)) {
    *error = path + ": cannot read (or empty)";
    return false;
  }
  auto blank = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
  while (!line.empty() && blank(line.back())) line.pop_back();
  size_t b = 0;
  while (b < line.size() && blank(line[b])) ++b;
  line.erase(0, b);
  if (line.empty()) {
    *error = path + ": empty";
    return false;
  }
  for (unsigned char c : line) {
    if (c <= 0x20 || c >= 0x7f) {
      OPENSSL_cleanse(line.data(), line.size());
      *error = path + ": the token has blanks or non-printable characters inside";
      return false;
    }
  }
  if (warning && (st.st_mode & (S_IRWXG | S_IRWXO))) {
    *warning = path + " is readable by group or others (chmod 600 it)";
  }
  *token = std::move(line);
  return true;
}

std::string NewKeyFileContent() {
  unsigned char b[32];
  if (RAND_bytes(b, sizeof b) != 1) return "";
  std::string s = Hex(b, sizeof b) + "\n";
  OPENSSL_cleanse(b, sizeof b);
  return s;
}

bool ParseDuration(const std::string& s, int64_t* seconds, std::string* error) {
  size_t i = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
  const std::string unit = s.substr(i);
  int64_t mult = unit.empty() || unit == "s" ? 1 : unit == "m" ? 60 : unit == "h" ? 3600 : unit == "d" ? 86400 : 0;
  if (i == 0 || i > 9 || mult == 0) {
    *error = "duration '" + s + "': expected a number with an optional unit s, m, h or d (e.g. 1h, 15m)";
    return false;
  }
  int64_t v = std::stoll(s.substr(0, i)) * mult;
  if (v <= 0) {
    *error = "duration '" + s + "': must be more than 0";
    return false;
  }
  *seconds = v;
  return true;
}

int64_t NowSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace ablate::jwt
