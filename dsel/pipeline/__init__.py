"""`dsel run`: the whole job from a corpus to a report, as resumable stages."""
