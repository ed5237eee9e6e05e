# The shape check of a streaming step (_step.StepPlan, _lowp.StepPlan): x (B, I), h (L, B, H_out),
# c (L, B, H) against the plan's model.
cdef inline bint step_shapes_match(Py_ssize_t[8] x_shape, Py_ssize_t[8] h_shape, Py_ssize_t[8] c_shape,
                                   Py_ssize_t input_size, Py_ssize_t n_layers, Py_ssize_t hidden_out,
                                   Py_ssize_t hidden) noexcept:
    cdef Py_ssize_t batch = x_shape[0]
    return (x_shape[1] == input_size and h_shape[0] == n_layers and h_shape[1] == batch
            and h_shape[2] == hidden_out and c_shape[0] == n_layers and c_shape[1] == batch
            and c_shape[2] == hidden)
