# Gate math of one LSTM cell, inline and nogil, for float and double.
# Internal gate order along the 4H axis is torch's: [i | f | g | o].
# Arithmetic stays in the array's own precision (typed constants: a bare 1.0 would promote
# float math to double and change both speed and bits).
from cython cimport floating
from libc.math cimport exp, expf, tanh, tanhf, log1p, log1pf, fabs, fabsf

# Activation codes, shared with lstm_fast/_activations.py (ONNX names).
cdef enum:
    ACT_SIGMOID = 0
    ACT_TANH = 1
    ACT_RELU = 2
    ACT_AFFINE = 3
    ACT_LEAKY_RELU = 4
    ACT_THRESHOLDED_RELU = 5
    ACT_SCALED_TANH = 6
    ACT_HARD_SIGMOID = 7
    ACT_ELU = 8
    ACT_SOFTSIGN = 9
    ACT_SOFTPLUS = 10


ctypedef struct CellSpec:
    # Everything beyond the standard cell: ONNX's activations (f for i/f/o, g for the candidate,
    # h for the output), pre-activation clip, coupled input-forget gate, peepholes.
    int standard            # 1: sigmoid/tanh/tanh, no clip, no peephole, no coupling (the fast path)
    int act[3]
    double alpha[3]
    double beta[3]
    double clip             # > 0: clamp every gate pre-activation to [-clip, clip]
    int input_forget        # 1: f = 1 - i
    int has_peephole        # 1: peephole weights [p_i | p_f | p_o], each (H,)


cdef inline floating sigmoid(floating x) noexcept nogil:
    # 1 / (1 + e^-x): e^-x overflows to inf for x < -88 (float) and gives exactly 0, never NaN
    cdef floating one = 1
    if floating is float:
        return one / (one + expf(-x))
    else:
        return one / (one + exp(-x))


cdef inline floating tanh_(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef inline floating activate(int code, floating x, double alpha, double beta) noexcept nogil:
    # ONNX activation functions with their alpha/beta (operator spec, LSTM section)
    cdef floating zero = 0
    cdef floating one = 1
    cdef floating a = <floating> alpha
    cdef floating b = <floating> beta
    cdef floating r
    if code == ACT_SIGMOID:
        return sigmoid(x)
    if code == ACT_TANH:
        return tanh_(x)
    if code == ACT_RELU:
        return x if x > zero else zero
    if code == ACT_AFFINE:
        return a * x + b
    if code == ACT_LEAKY_RELU:
        return x if x >= zero else a * x
    if code == ACT_THRESHOLDED_RELU:
        return x if x > a else zero
    if code == ACT_SCALED_TANH:
        return a * tanh_(b * x)
    if code == ACT_HARD_SIGMOID:
        r = a * x + b
        return zero if r < zero else (one if r > one else r)
    if code == ACT_ELU:
        if x >= zero:
            return x
        if floating is float:
            return a * (expf(x) - one)
        else:
            return a * (exp(x) - one)
    if code == ACT_SOFTSIGN:
        if floating is float:
            return x / (one + fabsf(x))
        else:
            return x / (one + fabs(x))
    # ACT_SOFTPLUS: log(1 + e^x), written so that large x does not overflow
    if floating is float:
        return (x if x > zero else zero) + log1pf(expf(-fabsf(x)))
    else:
        return (x if x > zero else zero) + log1p(exp(-fabs(x)))


cdef inline void cell_row_standard(Py_ssize_t hidden, const floating* gh, const floating* gx,
                                   const floating* bias, floating* c, floating* h_raw) noexcept nogil:
    # gates = gh + gx + bias; c = f*c + i*g; h_raw = o*tanh(c). One pass over the row's 4H gates.
    cdef Py_ssize_t j
    cdef floating gi, gf, gg, go, cn
    for j in range(hidden):
        gi = sigmoid(gh[j] + gx[j] + bias[j])
        gf = sigmoid(gh[hidden + j] + gx[hidden + j] + bias[hidden + j])
        gg = tanh_(gh[2 * hidden + j] + gx[2 * hidden + j] + bias[2 * hidden + j])
        go = sigmoid(gh[3 * hidden + j] + gx[3 * hidden + j] + bias[3 * hidden + j])
        cn = gf * c[j] + gi * gg
        c[j] = cn
        h_raw[j] = go * tanh_(cn)


cdef inline void cell_row_cached(Py_ssize_t hidden, const floating* gh, const floating* gx,
                                 const floating* bias, floating* c, floating* h_raw,
                                 floating* gates_out, floating* c_out) noexcept nogil:
    # The standard cell, also keeping what backward needs: activated gates [i|f|g|o] and c_t.
    cdef Py_ssize_t j
    cdef floating gi, gf, gg, go, cn
    for j in range(hidden):
        gi = sigmoid(gh[j] + gx[j] + bias[j])
        gf = sigmoid(gh[hidden + j] + gx[hidden + j] + bias[hidden + j])
        gg = tanh_(gh[2 * hidden + j] + gx[2 * hidden + j] + bias[2 * hidden + j])
        go = sigmoid(gh[3 * hidden + j] + gx[3 * hidden + j] + bias[3 * hidden + j])
        cn = gf * c[j] + gi * gg
        c[j] = cn
        h_raw[j] = go * tanh_(cn)
        gates_out[j] = gi
        gates_out[hidden + j] = gf
        gates_out[2 * hidden + j] = gg
        gates_out[3 * hidden + j] = go
        c_out[j] = cn


cdef inline floating _clip(floating x, double clip) noexcept nogil:
    cdef floating lim = <floating> clip
    if clip > 0:
        if x > lim:
            return lim
        if x < -lim:
            return -lim
    return x


cdef inline void cell_row_general(const CellSpec* spec, Py_ssize_t hidden, const floating* gh,
                                  const floating* gx, const floating* bias, const floating* peephole,
                                  floating* c, floating* h_raw) noexcept nogil:
    # ONNX's cell: peepholes i += p_i*c_prev, f += p_f*c_prev, o += p_o*c_new; clip before each
    # activation; f = 1 - i when input_forget.
    cdef Py_ssize_t j
    cdef floating zi, zf, zg, zo, gi, gf, gg, go, cp, cn
    cdef floating one = 1
    for j in range(hidden):
        cp = c[j]
        zi = gh[j] + gx[j] + bias[j]
        zf = gh[hidden + j] + gx[hidden + j] + bias[hidden + j]
        zg = gh[2 * hidden + j] + gx[2 * hidden + j] + bias[2 * hidden + j]
        zo = gh[3 * hidden + j] + gx[3 * hidden + j] + bias[3 * hidden + j]
        if spec.has_peephole:
            zi = zi + peephole[j] * cp
            zf = zf + peephole[hidden + j] * cp
        gi = activate(spec.act[0], _clip(zi, spec.clip), spec.alpha[0], spec.beta[0])
        if spec.input_forget:
            gf = one - gi
        else:
            gf = activate(spec.act[0], _clip(zf, spec.clip), spec.alpha[0], spec.beta[0])
        gg = activate(spec.act[1], _clip(zg, spec.clip), spec.alpha[1], spec.beta[1])
        cn = gf * cp + gi * gg
        if spec.has_peephole:
            zo = zo + peephole[2 * hidden + j] * cn
        go = activate(spec.act[0], _clip(zo, spec.clip), spec.alpha[0], spec.beta[0])
        c[j] = cn
        h_raw[j] = go * activate(spec.act[2], cn, spec.alpha[2], spec.beta[2])
