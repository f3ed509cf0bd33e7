#include "scheduler/metrics/registry.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "scheduler/util/log.h"

namespace ablate::scheduler {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(MetricsRegistryTest, RendersPrometheusTextWithCumulativeBuckets) {
  metrics::Registry r;
  auto* c = r.Counter("t_total", "a counter", {"method", "code"});
  auto* h = r.Histogram("t_seconds", "a histogram", {"method"}, {0.1, 1});
  c->Inc({"Get", "OK"});
  c->Inc({"Get", "OK"}, 2);
  h->Observe({"Get"}, 0.05);
  h->Observe({"Get"}, 0.5);
  h->Observe({"Get"}, 5);
  std::string text = r.Render();
  EXPECT_THAT(text, HasSubstr("# TYPE t_total counter\n"));
  EXPECT_THAT(text, HasSubstr("t_total{method=\"Get\",code=\"OK\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("t_seconds_bucket{method=\"Get\",le=\"0.1\"} 1\n"));
  EXPECT_THAT(text, HasSubstr("t_seconds_bucket{method=\"Get\",le=\"1\"} 2\n"));
  EXPECT_THAT(text, HasSubstr("t_seconds_bucket{method=\"Get\",le=\"+Inf\"} 3\n"));
  EXPECT_THAT(text, HasSubstr("t_seconds_count{method=\"Get\"} 3\n"));
}

TEST(MetricsRegistryTest, EscapesLabelValuesAndReplacesGauges) {
  metrics::Registry r;
  auto* g = r.Gauge("g", "gauge", {"metric"});
  g->ReplaceAll({{{"a\"b\\c"}, 1}});
  EXPECT_THAT(r.Render(), HasSubstr("g{metric=\"a\\\"b\\\\c\"} 1\n"));
  g->ReplaceAll({{{"x"}, 2}});
  EXPECT_THAT(r.Render(), Not(HasSubstr("a\\\"b")));
}

TEST(RedactDsnTest, NeverShowsThePassword) {
  EXPECT_EQ(RedactDsn("host=db user=a password=s3cret dbname=x"), "host=db user=a password=*** dbname=x");
  EXPECT_EQ(RedactDsn("host=db password='se cret' dbname=x"), "host=db password=*** dbname=x");
  EXPECT_EQ(RedactDsn("postgresql://alice:s3cret@db:5432/x"), "postgresql://alice:***@db:5432/x");
  EXPECT_EQ(RedactDsn("postgresql://db/x?user=a&password=s3cret"), "postgresql://db/x?user=a&password=***");
  EXPECT_EQ(RedactDsn("host=/tmp/sock dbname=x"), "host=/tmp/sock dbname=x");
}

}  // namespace
}  // namespace ablate::scheduler
