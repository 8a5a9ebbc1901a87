// J-SquaredReLU as a fused TensorFlow op (forward and gradient), CPU kernels.
//
//   JSquaredReLU:      y  = x + x*x/2   if x >= 0, else 0
//   JSquaredReLUGrad:  dx = dy * (x+1)  if x >= 0, else 0   (value dy at x = 0)
//
// The composite TensorFlow expression needs several passes over memory (square,
// scale, add, compare, select); these kernels read each input once and write
// once, with SIMD, on all intra-op threads.
//
// Half-precision inputs (float16, bfloat16) are computed in float32 and rounded
// once at the end; the pure-TensorFlow reference in jsrelu_op.py does the same,
// so both give bit-identical results for every dtype.

#define EIGEN_USE_THREADS

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/framework/tensor.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace robust_sparse {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TTypes;
using CPUDevice = Eigen::ThreadPoolDevice;

REGISTER_OP("JSquaredReLU")
    .Input("features: T")
    .Output("activations: T")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape)
    .Doc(R"doc(
J-SquaredReLU: x + x^2/2 where x >= 0, else 0 (elementwise).
)doc");

REGISTER_OP("JSquaredReLUGrad")
    .Input("gradients: T")
    .Input("features: T")
    .Output("backprops: T")
    .Attr("T: {half, bfloat16, float, double}")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape)
    .Doc(R"doc(
Gradient of J-SquaredReLU: gradients * (features + 1) where features >= 0,
else 0. The derivative at 0 is 1 (the right-hand limit), as in the paper.
)doc");

// Arithmetic type: half types are widened so that the result is rounded once.
template <typename T>
struct ComputeType {
  using type = T;
};
template <>
struct ComputeType<Eigen::half> {
  using type = float;
};
template <>
struct ComputeType<Eigen::bfloat16> {
  using type = float;
};

// Elements per parallel task are chosen by Eigen from this per-element cost
// (bytes loaded, bytes stored, compute cycles).
template <typename T>
Eigen::TensorOpCost ElementCost(int inputs) {
  return Eigen::TensorOpCost(inputs * sizeof(T), sizeof(T), 4);
}

// The kernels are written with Eigen's SIMD packets and a bit mask rather than
// `x >= 0 ? value : 0`: the compiler keeps that ternary as a branch, which
// mispredicts on half of all random inputs and made the op 10x slower than
// tf.nn.relu. pcmp_le(0, x) is false for NaN, so NaN maps to 0, as tf.where.
namespace internal = ::Eigen::internal;

// Outputs at least this large are written with non-temporal (streaming)
// stores: they will not fit in cache anyway, and streaming skips the
// read-for-ownership of every output line, which saves a third of the memory
// traffic of the forward pass. Smaller outputs stay in cache for the next layer.
constexpr size_t kStreamingBytes = size_t{16} << 20;

// Stores a packet to `to`, which must be packet-aligned when streaming.
template <bool kStream, typename Packet>
inline void StorePacket(typename internal::unpacket_traits<Packet>::type* to,
                        const Packet& packet) {
#if defined(__SSE2__)
  if constexpr (kStream && std::is_same_v<Packet, __m128>) {
    _mm_stream_ps(to, packet);
    return;
  } else if constexpr (kStream && std::is_same_v<Packet, __m128d>) {
    _mm_stream_pd(to, packet);
    return;
  }
#endif
  internal::pstoreu(to, packet);
}

// Number of leading elements to handle one by one so that `to + count` is
// aligned for packet stores (0 when not streaming).
template <bool kStream, typename Packet, typename C>
inline Eigen::Index AlignmentPrologue(const C* to, Eigen::Index n) {
  if constexpr (!kStream) return 0;
  const uintptr_t misalignment =
      reinterpret_cast<uintptr_t>(to) % sizeof(Packet);
  if (misalignment == 0 || misalignment % sizeof(C) != 0) return 0;
  return std::min<Eigen::Index>(
      n, (sizeof(Packet) - misalignment) / sizeof(C));
}

// Makes streaming stores visible to the thread that waits for this block.
template <bool kStream>
inline void FinishStores() {
#if defined(__SSE2__)
  if constexpr (kStream) _mm_sfence();
#endif
}

template <typename C, bool kStream>
void ForwardBlock(const C* x, C* y, Eigen::Index n) {
  using Packet = typename internal::packet_traits<C>::type;
  constexpr Eigen::Index kSize = internal::unpacket_traits<Packet>::size;
  const Packet zero = internal::pset1<Packet>(C(0));
  const Packet half = internal::pset1<Packet>(C(0.5));
  Eigen::Index i = 0;
  for (const Eigen::Index head = AlignmentPrologue<kStream, Packet>(y, n);
       i < head; ++i) {
    const C v = x[i];
    y[i] = v >= C(0) ? v + v * v * C(0.5) : C(0);
  }
  for (; i + kSize <= n; i += kSize) {
    const Packet v = internal::ploadu<Packet>(x + i);
    // Same order as the reference, x + (x*x)*0.5, hence same rounding.
    const Packet value =
        internal::padd(v, internal::pmul(internal::pmul(v, v), half));
    StorePacket<kStream>(y + i,
                         internal::pand(internal::pcmp_le(zero, v), value));
  }
  for (; i < n; ++i) {
    const C v = x[i];
    y[i] = v >= C(0) ? v + v * v * C(0.5) : C(0);
  }
  FinishStores<kStream>();
}

template <typename C, bool kStream>
void BackwardBlock(const C* dy, const C* x, C* dx, Eigen::Index n) {
  using Packet = typename internal::packet_traits<C>::type;
  constexpr Eigen::Index kSize = internal::unpacket_traits<Packet>::size;
  const Packet zero = internal::pset1<Packet>(C(0));
  const Packet one = internal::pset1<Packet>(C(1));
  Eigen::Index i = 0;
  for (const Eigen::Index head = AlignmentPrologue<kStream, Packet>(dx, n);
       i < head; ++i) {
    const C v = x[i];
    dx[i] = v >= C(0) ? dy[i] * (v + C(1)) : C(0);
  }
  for (; i + kSize <= n; i += kSize) {
    const Packet v = internal::ploadu<Packet>(x + i);
    const Packet value = internal::pmul(internal::ploadu<Packet>(dy + i),
                                        internal::padd(v, one));
    StorePacket<kStream>(dx + i,
                         internal::pand(internal::pcmp_le(zero, v), value));
  }
  for (; i < n; ++i) {
    const C v = x[i];
    dx[i] = v >= C(0) ? dy[i] * (v + C(1)) : C(0);
  }
  FinishStores<kStream>();
}

// Half types: widen a chunk to float on the stack, run the float kernel on it,
// round back once.
constexpr Eigen::Index kChunk = 512;

template <typename T>
void ForwardRange(const T* x, T* y, Eigen::Index n, bool stream) {
  using C = typename ComputeType<T>::type;
  if constexpr (std::is_same_v<T, C>) {
    if (stream) {
      ForwardBlock<C, true>(x, y, n);
    } else {
      ForwardBlock<C, false>(x, y, n);
    }
  } else {
    C buffer[kChunk];
    for (Eigen::Index start = 0; start < n; start += kChunk) {
      const Eigen::Index size = std::min(kChunk, n - start);
      for (Eigen::Index i = 0; i < size; ++i) {
        buffer[i] = static_cast<C>(x[start + i]);
      }
      ForwardBlock<C, false>(buffer, buffer, size);
      for (Eigen::Index i = 0; i < size; ++i) {
        y[start + i] = static_cast<T>(buffer[i]);
      }
    }
  }
}

template <typename T>
void BackwardRange(const T* dy, const T* x, T* dx, Eigen::Index n,
                   bool stream) {
  using C = typename ComputeType<T>::type;
  if constexpr (std::is_same_v<T, C>) {
    if (stream) {
      BackwardBlock<C, true>(dy, x, dx, n);
    } else {
      BackwardBlock<C, false>(dy, x, dx, n);
    }
  } else {
    C upstream[kChunk];
    C features[kChunk];
    for (Eigen::Index start = 0; start < n; start += kChunk) {
      const Eigen::Index size = std::min(kChunk, n - start);
      for (Eigen::Index i = 0; i < size; ++i) {
        upstream[i] = static_cast<C>(dy[start + i]);
        features[i] = static_cast<C>(x[start + i]);
      }
      BackwardBlock<C, false>(upstream, features, upstream, size);
      for (Eigen::Index i = 0; i < size; ++i) {
        dx[start + i] = static_cast<T>(upstream[i]);
      }
    }
  }
}

template <typename T>
struct JSquaredReLUFunctor {
  void operator()(const CPUDevice& d, const T* x, T* y, Eigen::Index n) {
    const bool stream = n * sizeof(T) >= kStreamingBytes;
    d.parallelFor(n, ElementCost<T>(1),
                  [x, y, stream](Eigen::Index begin, Eigen::Index end) {
                    ForwardRange<T>(x + begin, y + begin, end - begin, stream);
                  });
  }
};

template <typename T>
struct JSquaredReLUGradFunctor {
  void operator()(const CPUDevice& d, const T* dy, const T* x, T* dx,
                  Eigen::Index n) {
    const bool stream = n * sizeof(T) >= kStreamingBytes;
    d.parallelFor(n, ElementCost<T>(2),
                  [dy, x, dx, stream](Eigen::Index begin, Eigen::Index end) {
                    BackwardRange<T>(dy + begin, x + begin, dx + begin,
                                     end - begin, stream);
                  });
  }
};

template <typename T>
class JSquaredReLUOp : public OpKernel {
 public:
  explicit JSquaredReLUOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& features = context->input(0);
    Tensor* activations = nullptr;
    // Reuse the input buffer when TensorFlow says nobody else needs it.
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output(
                                {0}, 0, features.shape(), &activations));
    if (features.NumElements() == 0) return;
    JSquaredReLUFunctor<T>()(context->eigen_device<CPUDevice>(),
                             features.flat<T>().data(),
                             activations->flat<T>().data(),
                             features.NumElements());
  }
};

template <typename T>
class JSquaredReLUGradOp : public OpKernel {
 public:
  explicit JSquaredReLUGradOp(OpKernelConstruction* context)
      : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& gradients = context->input(0);
    const Tensor& features = context->input(1);
    OP_REQUIRES(context, gradients.shape() == features.shape(),
                ::tensorflow::errors::InvalidArgument(
                    "JSquaredReLUGrad: gradients and features must have the "
                    "same shape, got ",
                    gradients.shape().DebugString(), " and ",
                    features.shape().DebugString()));
    Tensor* backprops = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output(
                                {0}, 0, features.shape(), &backprops));
    if (features.NumElements() == 0) return;
    JSquaredReLUGradFunctor<T>()(context->eigen_device<CPUDevice>(),
                                 gradients.flat<T>().data(),
                                 features.flat<T>().data(),
                                 backprops->flat<T>().data(),
                                 features.NumElements());
  }
};

#define REGISTER_CPU_KERNELS(T)                                           \
  REGISTER_KERNEL_BUILDER(                                                \
      Name("JSquaredReLU").Device(DEVICE_CPU).TypeConstraint<T>("T"),     \
      JSquaredReLUOp<T>);                                                 \
  REGISTER_KERNEL_BUILDER(                                                \
      Name("JSquaredReLUGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
      JSquaredReLUGradOp<T>);

REGISTER_CPU_KERNELS(Eigen::half);
REGISTER_CPU_KERNELS(Eigen::bfloat16);
REGISTER_CPU_KERNELS(float);
REGISTER_CPU_KERNELS(double);

#undef REGISTER_CPU_KERNELS

}  // namespace robust_sparse
