"""What only the CPU needs: its instruction-set class (isa), what `auto` picks from it
(hardware), settings made before JAX starts (platform), and the oneDNN convolutions
(onednn_build: find, compile and load oneDNN; onednn_conv: the op and the one decision
whether a convolution runs on oneDNN or XLA; csrc/: the C++ side)."""
