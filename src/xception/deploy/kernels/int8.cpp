// Int8 convolutions for the static int8 CPU path (AVX2 + FMA): quint8 channels-last activations,
// int8 per-channel weights (zero point 0), int32 accumulation, requantized to quint8 with the
// same float arithmetic as PyTorch's quantized kernels (results match up to one step where a
// rounding falls the other way).
//
// Depthwise (dw_*): Xception's 3x3 depthwise convs are 2.5% of its multiply-adds but took 17% of
// the int8 network's time through oneDNN. 16 channels at a time; two taps are interleaved as int16
// pairs (unpacklo/hi_epi16) and one vpmaddwd multiplies both by their weights and sums the pair
// into int32: exact, no int16 saturation. A padded tap reads a row of the input's zero point, so
// every tap adds x * w and the zero point's share, zp * sum(w), is one constant per channel.
//
// Pointwise (pw_*): the 1x1 convs, ~93% of the multiply-adds, as a GEMM (pixels x C_in) x
// (C_in x C_out). Without VNNI, an int8 product on AVX2 is vpmaddubsw (u8 x s8 pairs summed into
// saturating int16) then vpmaddwd by ones into int32: two multiply-unit instructions per 32
// multiply-adds. Here two vpmaddubsw results are added in int16 before the vpmaddwd: three per 64,
// 1.33x the multiply throughput. That sum must fit in int16: 2 pairs * 2 * 127 * 63 = 32004 with
// 7-bit activations (what the x86 calibration produces on CPUs without VNNI) and weights in
// [-63, 63] (7-bit weights, rounded per output channel by pw_pack_int8; ~10x less error than the
// activations' own). A larger input value saturates (vpaddsw) instead of wrapping around.
//
// Ops (namespace xception):
//   dw_pack_int8(Tensor weight int8 (C, 1, KH, KW)) -> Tensor packed
//   dw_conv_int8(Tensor x, Tensor packed, Tensor weight_sum, Tensor weight_scale, Tensor bias,
//                int[2] kernel, int[2] stride, int[2] padding, int[2] dilation,
//                float out_scale, int out_zero_point, bool relu_in, bool relu_out) -> Tensor
//   pw_pack_int8(Tensor weight int8 (N, K, 1, 1) in [-63, 63]) -> Tensor packed
//   pw_conv_int8(Tensor x, Tensor packed, Tensor weight_sum, Tensor weight_scale, Tensor bias,
//                int out_channels, int[2] stride, float out_scale, int out_zero_point, bool relu_out) -> Tensor
//   pw_conv_add_int8(... the same ..., Tensor other, float add_scale, int add_zero_point) -> Tensor
//                (other + the conv, PyTorch's quantized add fused into the conv's output)
// relu_in applies ReLU to the input as it is read (the quantized ReLU before a separable conv);
// relu_out clamps the output at its zero point (a fused ReLU).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 16;  // channels per AVX2 block
constexpr int64_t kHalf = 8;    // channels per SSE block (the tail of e.g. 728 = 45 * 16 + 8)
// Where a block's channels sit in its two int32 accumulators: unpacklo_epi16 on 256-bit registers
// takes channels 0-3 and 8-11 (one 128-bit lane each), unpackhi_epi16 channels 4-7 and 12-15.
constexpr int kOrder16[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

struct Layout {
  int64_t taps, pairs, blocks, halves, rest;  // rest: channels past the AVX2 and SSE blocks
  Layout(int64_t T, int64_t C)
      : taps(T), pairs((T + 1) / 2), blocks(C / kBlock), halves((C % kBlock) / kHalf), rest(C % kHalf) {}
  int64_t block_size() const { return pairs * 32; }
  int64_t half_size() const { return pairs * 16; }
  int64_t numel() const { return blocks * block_size() + halves * half_size() + taps * rest; }
};

// The order in which taps are paired. For 3x3 kernels the first two rows pair vertically, column
// by column, and the last row pairs left to right: (0,0)+(1,0), (0,1)+(1,1), (0,2)+(1,2),
// (2,0)+(2,1), (2,2) alone. A pair of vertical taps is then the same input values for three
// neighbouring output pixels, so the stride-1 row kernel widens each input column once and reuses
// it (dw_row3x3). Other kernels pair in raster order.
std::vector<int64_t> tap_order(int64_t kh, int64_t kw) {
  if (kh == 3 && kw == 3) return {0, 3, 1, 4, 2, 5, 6, 7, 8};
  std::vector<int64_t> order(kh * kw);
  for (int64_t t = 0; t < kh * kw; ++t) order[t] = t;
  return order;
}

// What both ops share: the input check, and the per-channel requantization
// q = round(acc * mult[c] + offset[c]) with mult = s_x * s_w / s_y and
// offset = bias / s_y - mult * zp_x * sum(w) + zp_y (the input zero point's share of the sum).
void check_input(const char* op, const at::Tensor& x, int64_t out_zero_point) {
  TORCH_CHECK(x.is_quantized() && x.scalar_type() == at::kQUInt8 && x.qscheme() == at::kPerTensorAffine &&
                  x.dim() == 4,
              op, ": expected a per-tensor quint8 (N, C, H, W) input");
  TORCH_CHECK(out_zero_point >= 0 && out_zero_point <= 255, op, ": output zero point out of range");
}

struct Requant {
  std::vector<float> mult, offset;  // per output channel, in channel order
  Requant(const char* op, const at::Tensor& x, int64_t channels, const at::Tensor& weight_sum,
          const at::Tensor& weight_scale, const at::Tensor& bias, double out_scale, int64_t out_zero_point)
      : mult(channels), offset(channels) {
    TORCH_CHECK(weight_sum.numel() == channels && weight_scale.numel() == channels && bias.numel() == channels,
                op, ": per-channel tensors must have ", channels, " values");
    const at::Tensor sums = weight_sum.to(at::kInt).contiguous();
    const at::Tensor scales = weight_scale.to(at::kFloat).contiguous();
    const at::Tensor biases = bias.to(at::kFloat).contiguous();
    const float* sp = scales.data_ptr<float>();
    const float* bp = biases.data_ptr<float>();
    const int32_t* ws = sums.data_ptr<int32_t>();
    const float in_scale = static_cast<float>(x.q_scale()), inv_out = static_cast<float>(1.0 / out_scale);
    const float zp = static_cast<float>(x.q_zero_point());
    for (int64_t c = 0; c < channels; ++c) {
      mult[c] = in_scale * sp[c] * inv_out;
      offset[c] = bp[c] * inv_out - mult[c] * zp * static_cast<float>(ws[c]) + static_cast<float>(out_zero_point);
    }
  }
};

// (C, 1, KH, KW) int8 -> int16, taps in tap_order: per 16-channel block and tap pair, 32 values
// [w_t, w_t+1] in the accumulator order; then the 8-channel block the same way in SSE order;
// then (taps, rest) plain.
at::Tensor dw_pack_int8(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.scalar_type() == at::kChar,
              "dw_pack_int8: expected int8 weights of shape (C, 1, KH, KW), got ", weight.sizes());
  const std::vector<int64_t> order = tap_order(weight.size(2), weight.size(3));
  const at::Tensor w = weight.to(at::kShort)
                           .reshape({weight.size(0), -1})
                           .index_select(1, at::tensor(order, at::kLong))
                           .t()
                           .contiguous();  // (T, C), taps in pairing order
  const int64_t T = w.size(0), C = w.size(1);
  const Layout L(T, C);
  at::Tensor out = at::zeros({L.numel()}, at::kShort);
  const int16_t* src = w.data_ptr<int16_t>();
  int16_t* dst = out.data_ptr<int16_t>();
  auto tap = [&](int64_t t, int64_t c) -> int16_t { return t < T ? src[t * C + c] : 0; };
  for (int64_t b = 0; b < L.blocks; ++b)
    for (int64_t p = 0; p < L.pairs; ++p)
      for (int k = 0; k < 16; ++k) {
        const int64_t c = b * kBlock + kOrder16[k];
        int16_t* d = dst + b * L.block_size() + p * 32 + 2 * k;
        d[0] = tap(2 * p, c);
        d[1] = tap(2 * p + 1, c);
      }
  int16_t* h = dst + L.blocks * L.block_size();
  for (int64_t p = 0; p < L.pairs && L.halves; ++p)
    for (int k = 0; k < 8; ++k) {  // 128-bit unpacklo/hi: channels 0-3, then 4-7
      const int64_t c = L.blocks * kBlock + k;
      h[p * 16 + 2 * k] = tap(2 * p, c);
      h[p * 16 + 2 * k + 1] = tap(2 * p + 1, c);
    }
  int16_t* r = h + L.halves * L.half_size();
  const int64_t c0 = C - L.rest;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < L.rest; ++c) r[t * L.rest + c] = src[t * C + c0 + c];
  return out;
}

template <bool ReluIn>
inline __m256i load16(const uint8_t* p, __m128i zp) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (ReluIn) v = _mm_max_epu8(v, zp);
  return _mm256_cvtepu8_epi16(v);
}

template <bool ReluIn>
inline __m128i load8(const uint8_t* p, __m128i zp) {
  __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  if (ReluIn) v = _mm_max_epu8(v, zp);
  return _mm_cvtepu8_epi16(v);
}

// Requantizes two accumulators (16 channels in accumulator order) and stores 16 bytes.
inline void requant16(__m256i acc_a, __m256i acc_b, const float* m, __m256i lo8, uint8_t* out) {
  const __m256i qa =
      _mm256_cvtps_epi32(_mm256_fmadd_ps(_mm256_cvtepi32_ps(acc_a), _mm256_loadu_ps(m), _mm256_loadu_ps(m + 16)));
  const __m256i qb =
      _mm256_cvtps_epi32(_mm256_fmadd_ps(_mm256_cvtepi32_ps(acc_b), _mm256_loadu_ps(m + 8), _mm256_loadu_ps(m + 24)));
  const __m256i q16 = _mm256_packs_epi32(qa, qb);  // int16, channels 0-7 | 8-15
  const __m256i q8 = _mm256_permute4x64_epi64(_mm256_packus_epi16(q16, q16), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(_mm256_max_epu8(q8, lo8)));
}

// One output pixel (its channels from block first_block on). taps: 2 * pairs input pointers in
// tap_order (padded taps and the odd one out point at a row of zero points); mb: per 16-channel block 32 floats (multipliers, then offsets, in
// accumulator order), then 16 for the 8-channel block, then 2 * rest.
template <int Pairs, bool ReluIn>
inline void pixel(const uint8_t* const* taps, int64_t pairs_rt, const Layout& L, const int16_t* w, const float* mb,
                  uint8_t* out, __m128i zp8, uint8_t zp, uint8_t lo, int64_t first_block = 0) {
  const int64_t pairs = Pairs > 0 ? Pairs : pairs_rt;
  const __m256i lo8 = _mm256_set1_epi8(static_cast<char>(lo));
  for (int64_t b = first_block; b < L.blocks; ++b) {
    const int64_t c0 = b * kBlock;
    const __m256i* wv = reinterpret_cast<const __m256i*>(w + b * L.block_size());
    __m256i acc_a = _mm256_setzero_si256(), acc_b = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int64_t p = 0; p < pairs; ++p) {
      const __m256i v0 = load16<ReluIn>(taps[2 * p] + c0, zp8), v1 = load16<ReluIn>(taps[2 * p + 1] + c0, zp8);
      acc_a = _mm256_add_epi32(acc_a, _mm256_madd_epi16(_mm256_unpacklo_epi16(v0, v1), _mm256_loadu_si256(wv + 2 * p)));
      acc_b = _mm256_add_epi32(acc_b, _mm256_madd_epi16(_mm256_unpackhi_epi16(v0, v1), _mm256_loadu_si256(wv + 2 * p + 1)));
    }
    requant16(acc_a, acc_b, mb + b * 32, lo8, out + c0);
  }
  int64_t c0 = L.blocks * kBlock;
  const float* m = mb + L.blocks * 32;
  if (L.halves) {
    const __m128i* wv = reinterpret_cast<const __m128i*>(w + L.blocks * L.block_size());
    __m128i acc_a = _mm_setzero_si128(), acc_b = _mm_setzero_si128();
    for (int64_t p = 0; p < pairs; ++p) {
      const __m128i v0 = load8<ReluIn>(taps[2 * p] + c0, zp8), v1 = load8<ReluIn>(taps[2 * p + 1] + c0, zp8);
      acc_a = _mm_add_epi32(acc_a, _mm_madd_epi16(_mm_unpacklo_epi16(v0, v1), _mm_loadu_si128(wv + 2 * p)));
      acc_b = _mm_add_epi32(acc_b, _mm_madd_epi16(_mm_unpackhi_epi16(v0, v1), _mm_loadu_si128(wv + 2 * p + 1)));
    }
    const __m256i acc = _mm256_inserti128_si256(_mm256_castsi128_si256(acc_a), acc_b, 1);  // channels 0-7
    const __m256i q = _mm256_cvtps_epi32(_mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_loadu_ps(m), _mm256_loadu_ps(m + 8)));
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    const __m128i q8 = _mm_max_epu8(_mm_packus_epi16(q16, q16), _mm_set1_epi8(static_cast<char>(lo)));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + c0), q8);
    c0 += kHalf;
    m += 16;
  }
  const int16_t* wr = w + L.blocks * L.block_size() + L.halves * L.half_size();
  for (int64_t c = 0; c < L.rest; ++c) {
    int32_t acc = 0;
    for (int64_t t = 0; t < L.taps; ++t) {
      const uint8_t v = taps[t][c0 + c];
      acc += static_cast<int32_t>(ReluIn ? std::max(v, zp) : v) * wr[t * L.rest + c];
    }
    const int q = static_cast<int>(std::nearbyint(acc * m[c] + m[L.rest + c]));
    out[c0 + c] = static_cast<uint8_t>(std::min(255, std::max(static_cast<int>(lo), q)));
  }
}

// One output row of a 3x3, stride-1, dilation-1 depthwise conv, the 16-channel blocks only. rows:
// the three input rows (a row of zero points where the row is padding); pw: left padding. Per
// block the row is walked left to right; each output pixel widens one new input column (its three
// bytes -> int16; columns outside the input read the zero point) and reuses the pairs of the two
// columns before it.
template <bool ReluIn>
void dw_row3x3(const uint8_t* const rows[3], int64_t W, int64_t OW, int64_t pw, int64_t C, const Layout& L,
               const int16_t* w, const float* mb, uint8_t* out, __m128i zp8, uint8_t lo) {
  const __m256i lo8 = _mm256_set1_epi8(static_cast<char>(lo));
  const __m256i zp16 = _mm256_cvtepu8_epi16(zp8);
  const uint8_t *r0 = rows[0], *r1 = rows[1], *r2 = rows[2];
  const int64_t blocks = L.blocks, block_size = L.block_size();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c0 = b * kBlock;
    const __m256i* wv = reinterpret_cast<const __m256i*>(w + b * block_size);
    const float* m = mb + b * 32;
    auto column = [&](int64_t ic, __m256i& z0, __m256i& z1, __m256i& z2) {
      if (ic < 0 || ic >= W) {
        z0 = z1 = z2 = zp16;
      } else {
        z0 = load16<ReluIn>(r0 + ic * C + c0, zp8);
        z1 = load16<ReluIn>(r1 + ic * C + c0, zp8);
        z2 = load16<ReluIn>(r2 + ic * C + c0, zp8);
      }
    };
    // columns a = ow - pw and a + 1 of the first pixel: vertical pairs, and row 2 widened
    __m256i z0, z1, z2, a2, b2;
    column(-pw, z0, z1, a2);
    __m256i va_lo = _mm256_unpacklo_epi16(z0, z1), va_hi = _mm256_unpackhi_epi16(z0, z1);
    column(1 - pw, z0, z1, b2);
    __m256i vb_lo = _mm256_unpacklo_epi16(z0, z1), vb_hi = _mm256_unpackhi_epi16(z0, z1);
    for (int64_t ow = 0; ow < OW; ++ow) {
      __m256i c2;
      column(ow - pw + 2, z0, z1, c2);
      const __m256i vc_lo = _mm256_unpacklo_epi16(z0, z1), vc_hi = _mm256_unpackhi_epi16(z0, z1);
      __m256i acc_a = _mm256_madd_epi16(va_lo, _mm256_loadu_si256(wv + 0));
      __m256i acc_b = _mm256_madd_epi16(va_hi, _mm256_loadu_si256(wv + 1));
      acc_a = _mm256_add_epi32(acc_a, _mm256_madd_epi16(vb_lo, _mm256_loadu_si256(wv + 2)));
      acc_b = _mm256_add_epi32(acc_b, _mm256_madd_epi16(vb_hi, _mm256_loadu_si256(wv + 3)));
      acc_a = _mm256_add_epi32(acc_a, _mm256_madd_epi16(vc_lo, _mm256_loadu_si256(wv + 4)));
      acc_b = _mm256_add_epi32(acc_b, _mm256_madd_epi16(vc_hi, _mm256_loadu_si256(wv + 5)));
      acc_a = _mm256_add_epi32(acc_a, _mm256_madd_epi16(_mm256_unpacklo_epi16(a2, b2), _mm256_loadu_si256(wv + 6)));
      acc_b = _mm256_add_epi32(acc_b, _mm256_madd_epi16(_mm256_unpackhi_epi16(a2, b2), _mm256_loadu_si256(wv + 7)));
      // (2,2) pairs with a zero weight: any partner value will do
      acc_a = _mm256_add_epi32(acc_a, _mm256_madd_epi16(_mm256_unpacklo_epi16(c2, c2), _mm256_loadu_si256(wv + 8)));
      acc_b = _mm256_add_epi32(acc_b, _mm256_madd_epi16(_mm256_unpackhi_epi16(c2, c2), _mm256_loadu_si256(wv + 9)));
      requant16(acc_a, acc_b, m, lo8, out + ow * C + c0);
      va_lo = vb_lo, va_hi = vb_hi, vb_lo = vc_lo, vb_hi = vc_hi;
      a2 = b2, b2 = c2;
    }
  }
}

at::Tensor dw_conv_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_sum,
                        const at::Tensor& weight_scale, const at::Tensor& bias, at::IntArrayRef kernel,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, double out_scale,
                        int64_t out_zero_point, bool relu_in, bool relu_out) {
  check_input("dw_conv_int8", x, out_zero_point);
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "dw_conv_int8: kernel, stride, padding and dilation take two values each");
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3);
  const int64_t kh = kernel[0], kw = kernel[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1], dh = dilation[0], dw = dilation[1];
  const int64_t OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1, OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "dw_conv_int8: input ", H, "x", W, " too small for the kernel");
  const Layout L(kh * kw, C);
  TORCH_CHECK(packed.scalar_type() == at::kShort && packed.numel() == L.numel(),
              "dw_conv_int8: packed weights do not fit a ", C, "-channel ", kh, "x", kw, " depthwise conv");
  const Requant R("dw_conv_int8", xc, C, weight_sum, weight_scale, bias, out_scale, out_zero_point);
  at::Tensor y = at::_empty_affine_quantized({N, C, OH, OW}, at::device(at::kCPU).dtype(at::kQUInt8), out_scale,
                                             out_zero_point, at::MemoryFormat::ChannelsLast);
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(xc.data_ptr<c10::quint8>());
  uint8_t* yp = reinterpret_cast<uint8_t*>(y.data_ptr<c10::quint8>());
  const int16_t* wp = packed.data_ptr<int16_t>();
  const int xzp = static_cast<int>(xc.q_zero_point());
  const uint8_t lo = relu_out ? static_cast<uint8_t>(out_zero_point) : 0;

  // multipliers and offsets in the kernel's accumulator order
  std::vector<float> mb(L.blocks * 32 + L.halves * 16 + 2 * L.rest);
  for (int64_t b = 0; b < L.blocks; ++b)
    for (int k = 0; k < 16; ++k) {
      const int64_t c = b * kBlock + kOrder16[k];
      mb[b * 32 + k] = R.mult[c];
      mb[b * 32 + 16 + k] = R.offset[c];
    }
  float* mh = mb.data() + L.blocks * 32;
  for (int64_t k = 0; k < kHalf * L.halves; ++k) {
    mh[k] = R.mult[L.blocks * kBlock + k];
    mh[8 + k] = R.offset[L.blocks * kBlock + k];
  }
  float* mr = mh + L.halves * 16;
  for (int64_t c = 0; c < L.rest; ++c) {
    mr[c] = R.mult[C - L.rest + c];
    mr[L.rest + c] = R.offset[C - L.rest + c];
  }
  // 3x3, stride 1, dilation 1 (all of Xception's depthwise convs): the row kernel for the 16-channel
  // blocks, the per-pixel one for the channels after them. A padded row reads a row of zero points.
  const bool rows3x3 = kh == 3 && kw == 3 && sh == 1 && sw == 1 && dh == 1 && dw == 1 && L.blocks > 0;
  const std::vector<uint8_t> pad_row(std::max(C + kBlock, rows3x3 ? W * C : 0), static_cast<uint8_t>(xzp));
  const uint8_t* pad = pad_row.data();
  const float* mbp = mb.data();
  const __m128i zp8 = _mm_set1_epi8(static_cast<char>(xzp));
  const uint8_t zp = static_cast<uint8_t>(xzp);
  const std::vector<int64_t> order = tap_order(kh, kw);

  at::parallel_for(0, N * OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<const uint8_t*> taps(2 * L.pairs, pad);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / OH, oh = row % OH;
      uint8_t* out_row = yp + (n * OH + oh) * OW * C;
      if (rows3x3) {
        const uint8_t* rows[3];
        for (int64_t i = 0; i < 3; ++i) {
          const int64_t ih = oh - ph + i;
          rows[i] = ih >= 0 && ih < H ? xp + (n * H + ih) * W * C : pad;
        }
        relu_in ? dw_row3x3<true>(rows, W, OW, pw, C, L, wp, mbp, out_row, zp8, lo)
                : dw_row3x3<false>(rows, W, OW, pw, C, L, wp, mbp, out_row, zp8, lo);
        if (!L.halves && !L.rest) continue;
      }
      const int64_t first_block = rows3x3 ? L.blocks : 0;
      for (int64_t ow = 0; ow < OW; ++ow) {
        for (int64_t k = 0; k < kh * kw; ++k) {
          const int64_t ih = oh * sh - ph + order[k] / kw * dh, iw = ow * sw - pw + order[k] % kw * dw;
          taps[k] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? xp + ((n * H + ih) * W + iw) * C : pad;
        }
        uint8_t* out = out_row + ow * C;
        if (L.pairs == 5)  // 9 taps, Xception's 3x3: fully unrolled
          relu_in ? pixel<5, true>(taps.data(), 5, L, wp, mbp, out, zp8, zp, lo, first_block)
                  : pixel<5, false>(taps.data(), 5, L, wp, mbp, out, zp8, zp, lo, first_block);
        else
          relu_in ? pixel<0, true>(taps.data(), L.pairs, L, wp, mbp, out, zp8, zp, lo, first_block)
                  : pixel<0, false>(taps.data(), L.pairs, L, wp, mbp, out, zp8, zp, lo, first_block);
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------
// Pointwise

constexpr int64_t kCols = 16;   // output channels per micro-tile (two int32 accumulators)
constexpr int64_t kRows = 4;    // pixels per micro-tile
constexpr int64_t kChunk = 128; // pixels per cache block (128 x C_in bytes stay in L2)
// Columns in the accumulators: the first holds channels 0-3 and 8-11, the second 4-7 and 12-15,
// so that packs_epi32 + packus_epi16 put the 16 bytes back in order.
constexpr int kColOrder[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};

// (N, K, 1, 1) int8 in [-63, 63], K % 8 == 0 -> per 16 output channels, per 4 input channels:
// 16 x 4 bytes (one 256-bit register per 8 channels, 4 consecutive k each). Channels past N are 0.
at::Tensor pw_pack_int8(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1 && weight.scalar_type() == at::kChar,
              "pw_pack_int8: expected int8 weights of shape (N, K, 1, 1), got ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K % 8 == 0, "pw_pack_int8: input channels must be a multiple of 8, got ", K);
  const at::Tensor w = weight.reshape({N, K}).contiguous();
  TORCH_CHECK(w.abs().max().item<int>() <= 63, "pw_pack_int8: weights must lie in [-63, 63]");
  const int64_t nb = (N + kCols - 1) / kCols;
  at::Tensor out = at::zeros({nb * (K / 4) * 64}, at::kChar);
  const int8_t* src = w.data_ptr<int8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t k4 = 0; k4 < K / 4; ++k4)
      for (int j = 0; j < 16; ++j) {
        const int64_t n = b * kCols + kColOrder[j];
        for (int i = 0; i < 4 && n < N; ++i) dst[((b * (K / 4) + k4) * 16 + j) * 4 + i] = src[n * K + k4 * 4 + i];
      }
  return out;
}

// A residual add fused into the 1x1 conv's output: out = other + conv, computed as PyTorch's
// quantized add computes it (both operands dequantized with one FMA each, summed, requantized)
// from the conv's own quantized output, so the fused graph matches the unfused one.
struct ResidualAdd {
  const uint8_t* other;  // quint8 (the output's shape, channels-last)
  float conv_scale, conv_zp, other_scale, other_zp, inv_out_scale, out_zp;
  int32_t conv_min;  // the conv output's lowest value: its zero point with a fused ReLU, else 0
};

// Bytes 0-3, 8-11, 4-7, 12-15: a row of 16 channels in the accumulators' order.
inline __m128i to_accumulator_order(__m128i v) {
  return _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15));
}

// a: R input pixels (K bytes each, lda apart); b: this column block's packed weights; mb: 32
// floats (multipliers, offsets) in accumulator order. Writes R x ncols bytes at out (row stride
// ldo); with add, out = other + conv, other being this tile's place in add->other.
// (Add is a template parameter: the extra epilogue, even skipped at run time, makes GCC allocate
// the multiply loop's registers worse and costs the plain conv a third of its speed.)
template <int R, bool Add>
inline void pw_tile(const uint8_t* a, int64_t lda, const int8_t* b, int64_t K, const float* mb, uint8_t* out,
                    int64_t ldo, int64_t ncols, __m256i lo8, const ResidualAdd* add, const uint8_t* other) {
  __m256i acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t k = 0; k < K; k += 8) {
    const __m256i* bv = reinterpret_cast<const __m256i*>(b + k * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      int32_t a0_, a1_;
      std::memcpy(&a0_, a + r * lda + k, 4);
      std::memcpy(&a1_, a + r * lda + k + 4, 4);
      const __m256i a0 = _mm256_set1_epi32(a0_), a1 = _mm256_set1_epi32(a1_);
      const __m256i t0 = _mm256_adds_epi16(_mm256_maddubs_epi16(a0, _mm256_loadu_si256(bv)),
                                           _mm256_maddubs_epi16(a1, _mm256_loadu_si256(bv + 2)));
      const __m256i t1 = _mm256_adds_epi16(_mm256_maddubs_epi16(a0, _mm256_loadu_si256(bv + 1)),
                                           _mm256_maddubs_epi16(a1, _mm256_loadu_si256(bv + 3)));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(t0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(t1, ones));
    }
  }
  const __m256 m0 = _mm256_loadu_ps(mb), m1 = _mm256_loadu_ps(mb + 8);
  const __m256 o0 = _mm256_loadu_ps(mb + 16), o1 = _mm256_loadu_ps(mb + 24);
  for (int r = 0; r < R; ++r) {
    __m256i q0 = _mm256_cvtps_epi32(_mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), m0, o0));
    __m256i q1 = _mm256_cvtps_epi32(_mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), m1, o1));
    if constexpr (Add) {
      // the conv's quantized output, as the unfused graph would have stored it
      const __m256i lo32 = _mm256_set1_epi32(add->conv_min), hi32 = _mm256_set1_epi32(255);
      q0 = _mm256_min_epi32(_mm256_max_epi32(q0, lo32), hi32);
      q1 = _mm256_min_epi32(_mm256_max_epi32(q1, lo32), hi32);
      __m128i ov;
      if (ncols == kCols) {
        ov = _mm_loadu_si128(reinterpret_cast<const __m128i*>(other + r * ldo));
      } else {
        alignas(16) uint8_t tmp[16] = {};
        std::memcpy(tmp, other + r * ldo, ncols);
        ov = _mm_load_si128(reinterpret_cast<const __m128i*>(tmp));
      }
      ov = to_accumulator_order(ov);
      const __m256 sc = _mm256_set1_ps(add->conv_scale), sr = _mm256_set1_ps(add->other_scale);
      const __m256 zc = _mm256_set1_ps(-add->conv_zp * add->conv_scale);
      const __m256 zr = _mm256_set1_ps(-add->other_zp * add->other_scale);
      const __m256 inv = _mm256_set1_ps(add->inv_out_scale);
      const __m256i zo = _mm256_set1_epi32(static_cast<int>(add->out_zp));
      const __m256 r0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(ov)), sr, zr);
      const __m256 r1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(ov, 8))), sr, zr);
      const __m256 c0 = _mm256_add_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(q0), sc, zc), r0);
      const __m256 c1 = _mm256_add_ps(_mm256_fmadd_ps(_mm256_cvtepi32_ps(q1), sc, zc), r1);
      q0 = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(c0, inv)), zo);
      q1 = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(c1, inv)), zo);
    }
    const __m256i q16 = _mm256_packs_epi32(q0, q1);  // int16, channels 0-7 | 8-15
    __m256i q8 = _mm256_permute4x64_epi64(_mm256_packus_epi16(q16, q16), 0x08);
    if constexpr (!Add) q8 = _mm256_max_epu8(q8, lo8);
    const __m128i v = _mm256_castsi256_si128(q8);
    if (ncols == kCols) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + r * ldo), v);
    } else {
      alignas(16) uint8_t tmp[16];
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), v);
      std::memcpy(out + r * ldo, tmp, ncols);
    }
  }
}

at::Tensor pw_conv(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_sum,
                   const at::Tensor& weight_scale, const at::Tensor& bias, int64_t out_channels,
                   at::IntArrayRef stride, double out_scale, int64_t out_zero_point, bool relu_out,
                   const at::Tensor* other, double add_scale, int64_t add_zero_point) {
  check_input(op, x, out_zero_point);
  TORCH_CHECK(stride.size() == 2, op, ": stride takes two values");
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t B = xc.size(0), K = xc.size(1), H = xc.size(2), W = xc.size(3), N = out_channels;
  const int64_t sh = stride[0], sw = stride[1];
  const int64_t OH = (H - 1) / sh + 1, OW = (W - 1) / sw + 1, M = B * OH * OW;
  const int64_t nb = (N + kCols - 1) / kCols;
  TORCH_CHECK(K % 8 == 0 && packed.scalar_type() == at::kChar && packed.numel() == nb * K * 16,
              op, ": packed weights do not fit a ", K, " -> ", N, " channel 1x1 conv");
  const Requant R(op, xc, N, weight_sum, weight_scale, bias, out_scale, out_zero_point);
  at::Tensor oc;
  ResidualAdd res{};
  if (other) {
    check_input(op, *other, add_zero_point);
    TORCH_CHECK(other->sizes() == at::IntArrayRef({B, N, OH, OW}), op, ": the residual has shape ", other->sizes(),
                ", the conv's output ", at::IntArrayRef({B, N, OH, OW}));
    oc = other->contiguous(at::MemoryFormat::ChannelsLast);
    res = {reinterpret_cast<const uint8_t*>(oc.data_ptr<c10::quint8>()), static_cast<float>(out_scale),
           static_cast<float>(out_zero_point), static_cast<float>(oc.q_scale()),
           static_cast<float>(oc.q_zero_point()), 1.0f / static_cast<float>(add_scale),
           static_cast<float>(add_zero_point), relu_out ? static_cast<int32_t>(out_zero_point) : 0};
  }
  const ResidualAdd* add = other ? &res : nullptr;
  at::Tensor y = at::_empty_affine_quantized({B, N, OH, OW}, at::device(at::kCPU).dtype(at::kQUInt8),
                                             other ? add_scale : out_scale, other ? add_zero_point : out_zero_point,
                                             at::MemoryFormat::ChannelsLast);
  const uint8_t* xp = reinterpret_cast<const uint8_t*>(xc.data_ptr<c10::quint8>());
  uint8_t* yp = reinterpret_cast<uint8_t*>(y.data_ptr<c10::quint8>());
  const int8_t* wp = packed.data_ptr<int8_t>();
  // multipliers and offsets in the tile's accumulator order; columns past N stay 0
  std::vector<float> mb(nb * 32, 0.f);
  for (int64_t b = 0; b < nb; ++b)
    for (int j = 0; j < 16; ++j) {
      const int64_t n = b * kCols + kColOrder[j];
      if (n >= N) continue;
      mb[b * 32 + j] = R.mult[n];
      mb[b * 32 + 16 + j] = R.offset[n];
    }
  const float* mbp = mb.data();
  const __m256i lo8 = _mm256_set1_epi8(static_cast<char>(relu_out ? out_zero_point : 0));
  const bool strided = sh != 1 || sw != 1;
  // Threads split the column blocks; each walks the pixels in chunks that stay in its L2 (a
  // strided conv first gathers its chunk's pixels into a contiguous buffer).
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> gathered(strided ? kChunk * K : 0);
    for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
      const int64_t m1 = std::min(M, m0 + kChunk);
      const uint8_t* a = xp + m0 * K;
      if (strided) {
        for (int64_t m = m0; m < m1; ++m) {
          const int64_t n = m / (OH * OW), r = m % (OH * OW), oh = r / OW, ow = r % OW;
          std::memcpy(gathered.data() + (m - m0) * K, xp + ((n * H + oh * sh) * W + ow * sw) * K, K);
        }
        a = gathered.data();
      }
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t ncols = std::min(kCols, N - b * kCols);
        const int8_t* wb = wp + b * K * 16;
        int64_t m = m0;
        const int64_t col = b * kCols;
        if (add) {
          for (; m + kRows <= m1; m += kRows)
            pw_tile<kRows, true>(a + (m - m0) * K, K, wb, K, mbp + b * 32, yp + m * N + col, N, ncols, lo8, add,
                                 add->other + m * N + col);
          for (; m < m1; ++m)
            pw_tile<1, true>(a + (m - m0) * K, K, wb, K, mbp + b * 32, yp + m * N + col, N, ncols, lo8, add,
                             add->other + m * N + col);
        } else {
          for (; m + kRows <= m1; m += kRows)
            pw_tile<kRows, false>(a + (m - m0) * K, K, wb, K, mbp + b * 32, yp + m * N + col, N, ncols, lo8,
                                  nullptr, nullptr);
          for (; m < m1; ++m)
            pw_tile<1, false>(a + (m - m0) * K, K, wb, K, mbp + b * 32, yp + m * N + col, N, ncols, lo8, nullptr,
                              nullptr);
        }
      }
    }
  });
  return y;
}

at::Tensor pw_conv_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_sum,
                        const at::Tensor& weight_scale, const at::Tensor& bias, int64_t out_channels,
                        at::IntArrayRef stride, double out_scale, int64_t out_zero_point, bool relu_out) {
  return pw_conv("pw_conv_int8", x, packed, weight_sum, weight_scale, bias, out_channels, stride, out_scale,
                 out_zero_point, relu_out, nullptr, 0.0, 0);
}

at::Tensor pw_conv_add_int8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& weight_sum,
                            const at::Tensor& weight_scale, const at::Tensor& bias, int64_t out_channels,
                            at::IntArrayRef stride, double out_scale, int64_t out_zero_point, bool relu_out,
                            const at::Tensor& other, double add_scale, int64_t add_zero_point) {
  return pw_conv("pw_conv_add_int8", x, packed, weight_sum, weight_scale, bias, out_channels, stride, out_scale,
                 out_zero_point, relu_out, &other, add_scale, add_zero_point);
}

}  // namespace

TORCH_LIBRARY(xception, m) {
  m.def("dw_pack_int8(Tensor weight) -> Tensor", &dw_pack_int8);
  m.def("dw_conv_int8(Tensor x, Tensor packed, Tensor weight_sum, Tensor weight_scale, Tensor bias, int[] kernel, "
        "int[] stride, int[] padding, int[] dilation, float out_scale, int out_zero_point, bool relu_in, "
        "bool relu_out) -> Tensor",
        &dw_conv_int8);
  m.def("pw_pack_int8(Tensor weight) -> Tensor", &pw_pack_int8);
  m.def("pw_conv_int8(Tensor x, Tensor packed, Tensor weight_sum, Tensor weight_scale, Tensor bias, "
        "int out_channels, int[] stride, float out_scale, int out_zero_point, bool relu_out) -> Tensor",
        &pw_conv_int8);
  m.def("pw_conv_add_int8(Tensor x, Tensor packed, Tensor weight_sum, Tensor weight_scale, Tensor bias, "
        "int out_channels, int[] stride, float out_scale, int out_zero_point, bool relu_out, Tensor other, "
        "float add_scale, int add_zero_point) -> Tensor",
        &pw_conv_add_int8);
}
