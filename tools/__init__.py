"""Tools around the course, kept apart from it: run from the repository root with `python -m tools.NAME`.

    reproduce.py, reproduce_report.py   the paper's Table 1 in miniature: every method, several seeds, one report
    benchmark.py, benchmark_cases.py,   speed and memory of every method's step, the default path against the
    benchmark_report.py, naive.py       authors' way of computing it (naive.py, also the tests' reference)
    validation.py                       the figures and numbers of results/fashion-mnist/VALIDATION.md
    student_study.sh                    the runs of results/student-study/STUDY.md
    tutorial.py                         tutorial.ipynb's helper module: its images, the runner of its scripts, its figures
    palette.py                          one colour per method, for every figure
    features.py, features_report.py     does a student learn features of its own: CKA to the teacher, attention maps
                                        and distances, prediction agreement (results/fashion-mnist/features/)
"""
