// The scheduler's bearer-token authentication (scheduler/rpc/auth.h): signed tokens map to the same principals
// as static ones, expired / wrong-key / revoked ones are refused with a reason that never quotes them, and the
// token files are re-read when they change (at most once per interval) while a broken file keeps the previous
// contents.
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>

#include "scheduler/rpc/auth.h"
#include "scheduler/rpc/jwt.h"
#include "tests/temp_dir.h"

namespace ablate::scheduler::rpc {
namespace {

namespace fs = std::filesystem;

const std::string kKey = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const std::string kKey2 = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
const std::string kStatic = "static-user-token-0123456789";

class AuthTest : public ::testing::Test {
 protected:
  test_util::TempDir tmp_{"ablate-auth-test"};
  void SetUp() override {
    dir_ = tmp_.path();
    now_ms_ = int64_t{1'800'000'000} * 1000;
  }

  // Replaces a file the way an operator's tooling should: a new file renamed over the old one.
  std::string Write(const std::string& name, const std::string& content) {
    const std::string p = dir_ + "/" + name, tmp = p + ".tmp";
    { std::ofstream(tmp) << content; }
    ::chmod(tmp.c_str(), 0600);
    fs::rename(tmp, p);
    return p;
  }

  std::unique_ptr<Authenticator> Make(std::chrono::milliseconds interval = std::chrono::milliseconds(1000)) {
    AuthOptions o;
    o.enabled = true;
    o.tokens_file = Write("tokens", "user alice " + kStatic + "\nworker w1 sha256:" + std::string(64, 'a') + "\n");
    o.signing_key_file = Write("key", kKey + "\n");
    o.revoked_tokens_file = Write("revoked", "# revoked jtis\n");
    o.reload_interval = interval;
    o.now_ms = [this] { return now_ms_.load(); };
    auto a = Authenticator::Create(o);
    EXPECT_TRUE(a.ok()) << a.status();
    return a.ok() ? std::move(*a) : nullptr;
  }

  std::string Token(const std::string& role, const std::string& sub, int64_t ttl = 3600, const std::string& key = kKey,
                    const std::string& jti = "") {
    jwt::Claims c;
    c.sub = sub;
    c.tenant = "team-a";
    c.role = role;
    c.jti = jti.empty() ? "jti-" + sub + "-" + std::to_string(++n_) : jti;
    c.iat = c.nbf = now_ms_ / 1000;
    c.exp = c.iat + ttl;
    return jwt::Sign(c, key);
  }

  Identity Auth(const Authenticator& a, const std::string& token, std::string* err) {
    err->clear();
    return a.AuthenticateBearer("Bearer " + token, err);
  }

  std::string dir_;
  std::atomic<int64_t> now_ms_{0};
  int n_ = 0;
};

TEST_F(AuthTest, SignedTokensMapToTheSamePrincipalsAsStaticOnes) {
  auto a = Make();
  ASSERT_TRUE(a);
  std::string err;
  Identity st = Auth(*a, kStatic, &err);
  EXPECT_EQ(st.role, Role::kUser);
  EXPECT_EQ(st.name, "alice");
  for (const auto& [role, want] : {std::pair{"user", Role::kUser}, std::pair{"admin", Role::kAdmin},
                                   std::pair{"worker", Role::kWorker}}) {
    Identity id = Auth(*a, Token(role, "w1"), &err);
    EXPECT_EQ(id.role, want) << role << ": " << err;
    EXPECT_EQ(id.name, "w1");
    EXPECT_EQ(id.tenant, "team-a");
    EXPECT_FALSE(id.token_id.empty());
    EXPECT_FALSE(id.via_cert);
  }
}

TEST_F(AuthTest, ExpiredWrongKeyRevokedAndMalformedAreRefused) {
  auto a = Make();
  ASSERT_TRUE(a);
  std::string err;
  const std::string expiring = Token("user", "bob", 60);
  EXPECT_EQ(Auth(*a, expiring, &err).role, Role::kUser) << err;
  now_ms_ += (60 + 31) * 1000;
  EXPECT_EQ(Auth(*a, expiring, &err).role, Role::kNone);
  EXPECT_EQ(err, "token expired");
  EXPECT_EQ(Auth(*a, Token("admin", "eve", 3600, kKey2), &err).role, Role::kNone);
  EXPECT_EQ(err, "invalid token signature");
  EXPECT_EQ(Auth(*a, "not-a-token-at-all-0123456789", &err).role, Role::kNone);
  EXPECT_EQ(err, "invalid bearer token");
  const std::string none = jwt::Base64UrlEncode(R"({"alg":"none"})") + "." +
                           jwt::Base64UrlEncode(R"({"sub":"x","role":"admin","tenant":"t","jti":"j","exp":9999999999})") + ".";
  EXPECT_EQ(Auth(*a, none, &err).role, Role::kNone);
  EXPECT_NE(err.find("algorithm"), std::string::npos) << err;
  EXPECT_EQ(a->AuthenticateBearer("Basic abc", &err).role, Role::kNone);
  // A wildcard subject is never a signed worker identity.
  EXPECT_EQ(Auth(*a, Token("worker", "*"), &err).role, Role::kNone);
  // Revocation: listed jti -> refused at the next look at the file, without a restart.
  const std::string t = Token("user", "carol", 3600, kKey, "jti-to-revoke");
  EXPECT_EQ(Auth(*a, t, &err).role, Role::kUser);
  Write("revoked", "# revoked\njti-to-revoke\n");
  now_ms_ += 1001;
  EXPECT_EQ(Auth(*a, t, &err).role, Role::kNone);
  EXPECT_EQ(err, "token revoked");
  for (const std::string& tok : {expiring, t}) EXPECT_EQ(err.find(tok.substr(0, 16)), std::string::npos);
}

TEST_F(AuthTest, FilesAreReReadAtMostOncePerIntervalAndBrokenOnesKeepThePrevious) {
  auto a = Make();
  ASSERT_TRUE(a);
  std::string err;
  const std::string t = Token("user", "dave", 3600, kKey, "jti-dave");
  // Revoked, but the interval has not passed: still accepted (the file is not even looked at).
  Write("revoked", "jti-dave\n");
  now_ms_ += 500;
  EXPECT_EQ(Auth(*a, t, &err).role, Role::kUser);
  now_ms_ += 600;
  EXPECT_EQ(Auth(*a, t, &err).role, Role::kNone);
  // A broken revocation file keeps the previous list (dave stays revoked).
  Write("revoked", "jti-dave trailing-garbage\n");
  now_ms_ += 1100;
  EXPECT_EQ(Auth(*a, t, &err).role, Role::kNone);
  EXPECT_EQ(err, "token revoked");
  // Un-revoked by a good file.
  Write("revoked", "\n");
  now_ms_ += 1100;
  EXPECT_EQ(Auth(*a, t, &err).role, Role::kUser) << err;
  // Static tokens: a removed line is refused, a broken file keeps the previous lines, an added line is accepted.
  Write("tokens", "admin root " + std::string("admin-token-0123456789") + "\n");
  now_ms_ += 1100;
  EXPECT_EQ(Auth(*a, kStatic, &err).role, Role::kNone);
  EXPECT_EQ(Auth(*a, "admin-token-0123456789", &err).role, Role::kAdmin);
  Write("tokens", "superuser root admin-token-0123456789\n");  // bad role: keeps the previous contents
  now_ms_ += 1100;
  EXPECT_EQ(Auth(*a, "admin-token-0123456789", &err).role, Role::kAdmin);
  fs::remove(dir_ + "/tokens");  // gone: keeps the previous contents too
  now_ms_ += 1100;
  EXPECT_EQ(Auth(*a, "admin-token-0123456789", &err).role, Role::kAdmin);
  // Key rotation: the new key on top, the old one below -> both verify; the old removed -> old tokens refused.
  const std::string old_key_token = Token("user", "erin");
  const std::string new_key_token = Token("user", "erin", 3600, kKey2);
  EXPECT_EQ(Auth(*a, new_key_token, &err).role, Role::kNone);
  Write("key", kKey2 + "\n" + kKey + "\n");
  now_ms_ += 1100;
  EXPECT_EQ(Auth(*a, new_key_token, &err).role, Role::kUser) << err;
  EXPECT_EQ(Auth(*a, old_key_token, &err).role, Role::kUser) << err;
  Write("key", kKey2 + "\n");
  now_ms_ += 1100;
  EXPECT_EQ(Auth(*a, old_key_token, &err).role, Role::kNone);
  Write("key", "too-short\n");  // refused: keeps kKey2
  now_ms_ += 1100;
  EXPECT_EQ(Auth(*a, new_key_token, &err).role, Role::kUser);
  EXPECT_EQ(a->ReloadNow(), 0);  // nothing changed since
}

TEST_F(AuthTest, ConcurrentCallsDuringReloadsSeeOneConsistentState) {
  auto a = Make(std::chrono::milliseconds(0));
  ASSERT_TRUE(a);
  const std::string t = Token("user", "frank", 3600, kKey, "jti-frank");
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::vector<std::thread> th;
  for (int i = 0; i < 4; ++i) {
    th.emplace_back([&] {
      std::string err;
      while (!stop) {
        Identity id = a->AuthenticateBearer("Bearer " + t, &err);
        if (id.role != Role::kUser && err != "token revoked") ++bad;
      }
    });
  }
  for (int i = 0; i < 50; ++i) Write("revoked", i % 2 ? "jti-frank\n" : "\n");
  stop = true;
  for (auto& x : th) x.join();
  EXPECT_EQ(bad.load(), 0);
}

TEST_F(AuthTest, StartFailsOnUnreadableOrBrokenFiles) {
  AuthOptions o;
  o.enabled = true;
  o.signing_key_file = dir_ + "/missing";
  EXPECT_FALSE(Authenticator::Create(o).ok());
  o.signing_key_file = Write("short", "short\n");
  EXPECT_FALSE(Authenticator::Create(o).ok());
  o.signing_key_file = Write("key", kKey + "\n");
  o.revoked_tokens_file = Write("revoked", "a b\n");
  EXPECT_FALSE(Authenticator::Create(o).ok());
  o.revoked_tokens_file = Write("revoked", "a\n");
  o.tokens_file = Write("tokens", "user x short\n");
  auto r = Authenticator::Create(o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(std::string(r.status().message()).find("short\n"), std::string::npos);
  o.tokens_file.clear();
  EXPECT_TRUE(Authenticator::Create(o).ok());
  // Without a signing key a signed token is refused with a hint, not accepted.
  auto legacy = Authenticator::Create(true, Write("tokens", "user x " + kStatic + "\n"));
  ASSERT_TRUE(legacy.ok());
  std::string err;
  EXPECT_EQ(Auth(**legacy, Token("user", "x"), &err).role, Role::kNone);
  EXPECT_NE(err.find("--token_signing_key_file"), std::string::npos) << err;
}

}  // namespace
}  // namespace ablate::scheduler::rpc
