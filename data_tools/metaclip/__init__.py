"""MetaCLIP curation ("Demystifying CLIP Data", Xu et al. 2023, Algorithm 1): match every caption against a
list of metadata entries, count the pairs per entry over the whole pool, and keep each pair with the
probability that caps head entries at ``t`` pairs while tail entries keep all theirs.

entries.py (the entries file, Aho-Corasick matching), balance.py (probabilities, the seeded per-(uid, entry)
draws), inputs.py (uid + caption from shards or metadata), job.py (the task phases), report.py (entry-count
json and plot).
"""

from data_tools.metaclip.config import MetaclipConfig
from data_tools.metaclip.job import metaclip_job

__all__ = ["MetaclipConfig", "metaclip_job"]
