// The plain C++ oracle of the SSD intra-chunk kernels (kernels/ssd_intra.h) against the same term written as a
// LibTorch composition in fp64 and differentiated by autograd: y, dx̄, dCB, dcs, on shapes with several groups,
// several heads per group, several chunks and chunk lengths that are not multiples of the kernels' tile.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <stdexcept>

#include "core/mixers/ssd.h"
#include "kernels/ssd_intra.h"
#include "tests/mixers/mixer_test_util.h"

namespace ablate::core {
namespace {

using testing::rel_err;

struct Case {
  int64_t B, nc, L, H, G, P;
};

struct Terms {
  torch::Tensor y, dxd, dcb, dcs;
};

// The contract's formulas in fp64 with autograd: cb (B,G,nc,L,L), xd (B,T,H,P), cs (B,H,nc,L), dy like xd.
Terms composite(const Case& c, const torch::Tensor& cb, const torch::Tensor& xd, const torch::Tensor& cs,
                const torch::Tensor& dy) {
  auto cbv = cb.to(torch::kDouble).detach().requires_grad_();
  auto xv = xd.to(torch::kDouble).detach().requires_grad_();
  auto csv = cs.to(torch::kDouble).detach().requires_grad_();
  const int64_t R = c.H / c.G;
  const auto lmat = decay_matrix(csv);                                                // (B,H,nc,L,L)
  const auto cbh = cbv.unsqueeze(2).expand({c.B, c.G, R, c.nc, c.L, c.L}).reshape({c.B, c.H, c.nc, c.L, c.L});
  const auto x5 = xv.reshape({c.B, c.nc, c.L, c.H, c.P});
  const auto y = torch::einsum("bhcls,bcshp->bclhp", {cbh * lmat, x5}).reshape({c.B, c.nc * c.L, c.H, c.P});
  y.backward(dy.to(torch::kDouble));
  return {y.detach(), xv.grad(), cbv.grad(), csv.grad()};
}

Terms reference(const Case& c, const torch::Tensor& cb, const torch::Tensor& xd, const torch::Tensor& cs,
                const torch::Tensor& dy) {
  kernels::SsdIntraShape s;
  s.B = c.B;
  s.nc = c.nc;
  s.L = c.L;
  s.H = c.H;
  s.G = c.G;
  s.P = c.P;
  auto y = torch::empty_like(xd), dxd = torch::empty_like(xd);
  auto dcb = torch::zeros_like(cb), dcs = torch::zeros_like(cs);
  kernels::SsdIntraFwdArgs f{s, cb.data_ptr(), xd.data_ptr(), cs.data_ptr<float>(), y.data_ptr<float>()};
  kernels::ssd_intra_forward_ref(f);
  kernels::SsdIntraBwdArgs b{s,
                             cb.data_ptr(),
                             xd.data_ptr(),
                             cs.data_ptr<float>(),
                             dy.data_ptr(),
                             dxd.data_ptr<float>(),
                             dcb.data_ptr<float>(),
                             dcs.data_ptr<float>()};
  kernels::ssd_intra_backward_ref(b);
  return {y, dxd, dcb, dcs};
}

// Chunk-local cumulative log-decays: cumsum of per-step log-decays in [-0.5, 0).
torch::Tensor make_cs(const Case& c) {
  return torch::cumsum(-0.5 * torch::rand({c.B, c.H, c.nc, c.L}) - 1e-3, -1);
}

TEST(SsdIntraReference, MatchesAutogradComposition) {
  const Case cases[] = {{1, 1, 8, 1, 1, 4}, {2, 3, 16, 4, 2, 8}, {1, 2, 24, 6, 3, 5}, {1, 2, 64, 4, 1, 16}};
  for (const auto& c : cases) {
    torch::manual_seed(7 + c.L + c.H);
    const auto cb = torch::randn({c.B, c.G, c.nc, c.L, c.L});
    const auto xd = torch::randn({c.B, c.nc * c.L, c.H, c.P});
    const auto cs = make_cs(c);
    const auto dy = torch::randn_like(xd);
    const auto ref = reference(c, cb, xd, cs, dy);
    const auto exp = composite(c, cb, xd, cs, dy);
    const double e_y = rel_err(ref.y, exp.y), e_dx = rel_err(ref.dxd, exp.dxd);
    const double e_cb = rel_err(ref.dcb, exp.dcb), e_cs = rel_err(ref.dcs, exp.dcs);
    std::cout << "[ error ] B" << c.B << " nc" << c.nc << " L" << c.L << " H" << c.H << " G" << c.G << " P" << c.P
              << ": y " << e_y << ", dxd " << e_dx << ", dcb " << e_cb << ", dcs " << e_cs << "\n";
    EXPECT_LT(e_y, 1e-5);
    EXPECT_LT(e_dx, 1e-5);
    EXPECT_LT(e_cb, 1e-5);
    EXPECT_LT(e_cs, 1e-4);  // row sums minus column sums: some cancellation
    EXPECT_GT(exp.dcs.abs().sum().item<double>(), 0.0);
  }
}

TEST(SsdIntraReference, RefusesNonFp32Data) {
  kernels::SsdIntraFwdArgs a;
  a.s = {1, 1, 8, 1, 1, 4, kernels::NsaDtype::kBF16};
  EXPECT_THROW(kernels::ssd_intra_forward_ref(a), std::invalid_argument);
  a.s = {1, 1, 8, 3, 2, 4, kernels::NsaDtype::kF32};  // heads not a multiple of groups
  EXPECT_THROW(kernels::ssd_intra_forward_ref(a), std::invalid_argument);
}

}  // namespace
}  // namespace ablate::core
