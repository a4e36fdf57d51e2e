"""What only the CPU needs: its instruction-set class (isa) and the machine's facts for a
run's record (hardware), settings made before JAX starts (platform), and the oneDNN kernels
(onednn_build: find, compile and load oneDNN; onednn_conv and onednn_batchnorm: the ops;
onednn_errors: their errors; csrc/: the C++ side). What a run uses is decided by
rotjax/compute.py."""
