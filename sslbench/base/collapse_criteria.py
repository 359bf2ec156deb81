"""What counts as a collapse, and which record keys are diagnostics.

Two parts read these: evaluation judges a run by them (``sslbench.evaluation.diagnostics``) and
reporting draws and sorts by them (``sslbench.reporting``), which never imports evaluation code.
"""

# Documented thresholds: below a tenth of the healthy spread, embeddings count as collapsed.
COLLAPSE_STD_RATIO = 0.1
# DINO: a teacher-student KL under this (nats) with an entropy at either extreme is a collapse.
COLLAPSE_KL = 1e-3
COLLAPSE_ENTROPY_EDGE = 0.02  # within 2% of ln K (uniform) or of 0 (one dimension)
# Every diagnostic a train record may carry (the report treats them as results, not protocol).
DIAGNOSTIC_KEYS = (
    "embedding_std",
    "embedding_std_healthy",
    "effective_rank",
    "teacher_entropy",
    "teacher_student_kl",
)
