// Signed bearer tokens (scheduler/rpc/jwt.h): encode/verify round trip, expiry and not-before with the leeway, a
// wrong key, tampered parts, alg "none" and other algorithms, malformed input, key files and durations.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "scheduler/rpc/jwt.h"

namespace ablate::jwt {
namespace {

const std::string kKey = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const std::string kOtherKey = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";
constexpr int64_t kNow = 1'800'000'000;

Claims Make(int64_t iat = kNow, int64_t ttl = 3600) {
  Claims c;
  c.sub = "alice";
  c.tenant = "team-a";
  c.role = "user";
  c.jti = "0f0e0d0c0b0a09080706050403020100";
  c.iat = c.nbf = iat;
  c.exp = iat + ttl;
  return c;
}

Error V(const std::string& token, int64_t now = kNow, std::vector<std::string> keys = {kKey}, Claims* out = nullptr,
        std::string* why = nullptr) {
  Claims c;
  std::string w;
  Error e = Verify(token, keys, now, kLeewaySeconds, out ? out : &c, why ? why : &w);
  return e;
}

TEST(JwtTest, Base64UrlRoundTripAndStrictness) {
  for (const std::string& s : std::vector<std::string>{"", "f", "fo", "foo", "foob", "fooba", "foobar",
                                                       std::string("\xff\xfe\x00\x01", 4)}) {
    std::string enc = Base64UrlEncode(s), dec;
    EXPECT_EQ(enc.find('='), std::string::npos);
    ASSERT_TRUE(Base64UrlDecode(enc, &dec)) << enc;
    EXPECT_EQ(dec, s);
  }
  std::string out;
  EXPECT_EQ(Base64UrlEncode("\xfb\xff"), "-_8");
  EXPECT_FALSE(Base64UrlDecode("Zm9v=", &out));   // padding
  EXPECT_FALSE(Base64UrlDecode("Zm+v", &out));    // the non-URL alphabet
  EXPECT_FALSE(Base64UrlDecode("Z", &out));       // impossible length
  EXPECT_FALSE(Base64UrlDecode("Zh", &out));      // stray bits ("Zg" is "f")
  EXPECT_TRUE(Base64UrlDecode("Zg", &out));
}

TEST(JwtTest, SignedTokenVerifiesAndCarriesItsClaims) {
  std::string t = Sign(Make(), kKey);
  EXPECT_TRUE(LooksLikeJws(t));
  EXPECT_FALSE(LooksLikeJws("0123456789abcdef0123456789abcdef"));
  Claims c;
  std::string why;
  ASSERT_EQ(V(t, kNow, {kKey}, &c, &why), Error::kOk) << why;
  EXPECT_EQ(c.sub, "alice");
  EXPECT_EQ(c.tenant, "team-a");
  EXPECT_EQ(c.role, "user");
  EXPECT_EQ(c.jti, "0f0e0d0c0b0a09080706050403020100");
  EXPECT_EQ(c.exp, kNow + 3600);
  // Any key of a rotation set verifies it.
  EXPECT_EQ(V(t, kNow, {kOtherKey, kKey}), Error::kOk);
  // The header is exactly ours.
  std::string header;
  ASSERT_TRUE(Base64UrlDecode(t.substr(0, t.find('.')), &header));
  EXPECT_EQ(header, R"({"alg":"HS256","typ":"JWT"})");
}

TEST(JwtTest, ExpiredAndNotYetValidWithTheLeeway) {
  std::string t = Sign(Make(kNow, 60), kKey);
  std::string why;
  EXPECT_EQ(V(t, kNow + 60 + kLeewaySeconds - 1), Error::kOk);
  EXPECT_EQ(V(t, kNow + 60 + kLeewaySeconds, {kKey}, nullptr, &why), Error::kExpired);
  EXPECT_EQ(why, "token expired");
  EXPECT_EQ(V(t, kNow + 86400), Error::kExpired);
  // nbf in the future: refused beyond the leeway, accepted within it.
  std::string future = Sign(Make(kNow + 600), kKey);
  EXPECT_EQ(V(future, kNow, {kKey}, nullptr, &why), Error::kNotYetValid);
  EXPECT_EQ(why, "token not yet valid");
  EXPECT_EQ(V(Sign(Make(kNow + kLeewaySeconds), kKey), kNow), Error::kOk);
}

TEST(JwtTest, WrongKeyAndTamperingAreBadSignatures) {
  std::string t = Sign(Make(), kKey);
  std::string why;
  EXPECT_EQ(V(t, kNow, {kOtherKey}, nullptr, &why), Error::kSignature);
  EXPECT_EQ(why, "invalid token signature");
  EXPECT_EQ(V(t, kNow, {}), Error::kSignature);  // no key at all
  // A payload changed to role admin, the signature kept.
  const size_t d1 = t.find('.'), d2 = t.find('.', d1 + 1);
  Claims admin = Make();
  admin.role = "admin";
  std::string forged_payload = Sign(admin, kOtherKey);
  forged_payload = forged_payload.substr(forged_payload.find('.') + 1);
  forged_payload = forged_payload.substr(0, forged_payload.find('.'));
  std::string tampered = t.substr(0, d1 + 1) + forged_payload + t.substr(d2);
  EXPECT_EQ(V(tampered), Error::kSignature);
  // A longer expiry, same signature.
  Claims longer = Make(kNow, 86400 * 365);
  std::string lp = Sign(longer, kKey);
  lp = lp.substr(lp.find('.') + 1);
  lp = lp.substr(0, lp.find('.'));
  EXPECT_EQ(V(t.substr(0, d1 + 1) + lp + t.substr(d2)), Error::kSignature);
  // One flipped signature character; a truncated signature; an empty signature.
  std::string flipped = t;
  flipped.back() = flipped.back() == 'A' ? 'B' : 'A';
  EXPECT_NE(V(flipped), Error::kOk);
  EXPECT_NE(V(t.substr(0, t.size() - 4)), Error::kOk);
  EXPECT_EQ(V(t.substr(0, d2 + 1)), Error::kSignature);
}

TEST(JwtTest, AlgNoneAndOtherAlgorithmsAreRefused) {
  const std::string payload =
      R"({"sub":"alice","tenant":"t","role":"admin","jti":"x","exp":)" + std::to_string(kNow + 3600) + "}";
  std::string why;
  for (const char* header : {R"({"alg":"none","typ":"JWT"})", R"({"alg":"None"})", R"({"alg":"HS512"})",
                             R"({"alg":"RS256"})", R"({"typ":"JWT"})", R"({"alg":["HS256"]})",
                             R"({"alg":"HS256","crit":["exp"]})"}) {
    // Unsigned (alg none style: empty signature) and with a signature made of our own key's MAC of another token.
    std::string unsigned_token = Base64UrlEncode(header) + "." + Base64UrlEncode(payload) + ".";
    EXPECT_EQ(V(unsigned_token, kNow, {kKey}, nullptr, &why), Error::kAlgorithm) << header;
    std::string sig = Sign(Make(), kKey);
    sig = sig.substr(sig.rfind('.'));
    EXPECT_EQ(V(Base64UrlEncode(header) + "." + Base64UrlEncode(payload) + sig), Error::kAlgorithm) << header;
  }
  EXPECT_EQ(V(Base64UrlEncode(R"({"alg":"none"})") + "." + Base64UrlEncode(payload) + ".", kNow, {kKey}, nullptr, &why),
            Error::kAlgorithm);
  EXPECT_NE(why.find("HS256"), std::string::npos) << why;
}

TEST(JwtTest, MalformedTokensAreRefusedWithoutQuotingThem) {
  std::string t = Sign(Make(), kKey);
  std::string why;
  for (const std::string& bad :
       {std::string(""), std::string("abc"), std::string("a.b"), t + ".x", std::string(".."), std::string("a..b"),
        "!!!." + t.substr(t.find('.') + 1), Base64UrlEncode("not json") + t.substr(t.find('.')),
        Base64UrlEncode("[1,2]") + t.substr(t.find('.')), std::string(5000, 'a') + "." + "b.c"}) {
    Error e = V(bad, kNow, {kKey}, nullptr, &why);
    EXPECT_TRUE(e == Error::kMalformed || e == Error::kAlgorithm) << bad.substr(0, 40) << " -> " << why;
    EXPECT_EQ(why.find(bad.substr(0, 20)), bad.empty() ? 0u : std::string::npos);
  }
}

TEST(JwtTest, ClaimsMustBePresentAndTyped) {
  // Signed by our key (so only the claim checks can refuse them): build through Sign with odd values.
  Claims c = Make();
  c.role = "root";
  EXPECT_EQ(V(Sign(c, kKey)), Error::kClaims);
  c = Make();
  c.sub = "";
  EXPECT_EQ(V(Sign(c, kKey)), Error::kClaims);
  c = Make();
  c.jti = "";
  EXPECT_EQ(V(Sign(c, kKey)), Error::kClaims);
  c = Make();
  c.tenant = "";
  EXPECT_EQ(V(Sign(c, kKey)), Error::kClaims);
  c = Make();
  c.sub = "bad\nname";
  EXPECT_EQ(V(Sign(c, kKey)), Error::kClaims);
}

TEST(JwtTest, KeyFilesAndDurations) {
  std::vector<std::string> keys;
  std::string err;
  EXPECT_TRUE(ParseKeyFile("# comment\n  " + kKey + "  \n\n" + kOtherKey + "\n", &keys, &err)) << err;
  ASSERT_EQ(keys.size(), 2u);
  EXPECT_EQ(keys[0], kKey);
  EXPECT_FALSE(ParseKeyFile("short-key\n", &keys, &err));
  EXPECT_EQ(err.find("short-key"), std::string::npos);  // never quoted
  EXPECT_FALSE(ParseKeyFile("\n# nothing\n", &keys, &err));
  EXPECT_FALSE(ParseKeyFile(kKey + " with blanks inside\n", &keys, &err));
  std::string gen = NewKeyFileContent();
  ASSERT_EQ(gen.size(), 65u);
  EXPECT_TRUE(ParseKeyFile(gen, &keys, &err));
  EXPECT_NE(NewKeyFileContent(), gen);
  std::string j1, j2;
  ASSERT_TRUE(NewJti(&j1) && NewJti(&j2));
  EXPECT_EQ(j1.size(), 32u);
  EXPECT_NE(j1, j2);

  int64_t s = 0;
  EXPECT_TRUE(ParseDuration("1h", &s, &err) && s == 3600);
  EXPECT_TRUE(ParseDuration("15m", &s, &err) && s == 900);
  EXPECT_TRUE(ParseDuration("90", &s, &err) && s == 90);
  EXPECT_TRUE(ParseDuration("2d", &s, &err) && s == 172800);
  for (const char* bad : {"", "h", "0", "0h", "-1h", "1.5h", "1w", "1h30m", "9999999999"})
    EXPECT_FALSE(ParseDuration(bad, &s, &err)) << bad;
}

}  // namespace
}  // namespace ablate::jwt
