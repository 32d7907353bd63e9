// Memory mapping and validation of Megatron .idx/.bin pairs and headerless token files.
#include "mapped.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

namespace dsel {

void fail(const std::string& path, const std::string& problem) { throw FormatError(path + ": " + problem); }

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, errno == ENOENT ? "file not found" : std::string("cannot open (") + std::strerror(errno) + ")");
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  size_ = st.st_size;
  if (size_ > 0) {
    void* p = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail(path, std::string("cannot mmap (") + std::strerror(errno) + ")");
    }
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), static_cast<size_t>(size_));
}

int64_t itemsize_of_code(int code) {
  static const int64_t sizes[] = {0, 1, 1, 2, 4, 8, 8, 4, 2};
  return (code >= 1 && code <= 8) ? sizes[code] : 0;
}

IndexedData::IndexedData(const std::string& prefix) : prefix_(prefix), idx_(prefix + ".idx"), bin_(prefix + ".bin") {
  check_header();
  check_documents();
  check_sequences();
}

void IndexedData::check_header() {
  const std::string& path = idx_.path();
  static const char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
  if (idx_.size() < 34) fail(path, "truncated index: " + std::to_string(idx_.size()) + " bytes, the header alone needs 34");
  const uint8_t* p = idx_.data();
  if (std::memcmp(p, kMagic, 9) != 0) fail(path, "not a Megatron index (wrong magic, expected MMIDIDX)");
  int64_t version = load<int64_t>(p + 9, 0);
  if (version != 1) fail(path, "unsupported index version " + std::to_string(version) + " (expected 1)");
  code_ = p[17];
  itemsize_ = itemsize_of_code(code_);
  if (itemsize_ == 0) fail(path, "unknown dtype code " + std::to_string(code_) + " (expected 1..8)");
  n_ = load<int64_t>(p + 18, 0);
  d_ = load<int64_t>(p + 26, 0);
  if (n_ < 0 || d_ < 1 || n_ > (int64_t(1) << 40) || d_ > (int64_t(1) << 40))
    fail(path, "corrupt header: " + std::to_string(n_) + " sequences, " + std::to_string(d_) + " document entries");
  int64_t need = 34 + 12 * n_ + 8 * d_;
  if (idx_.size() < need)
    fail(path, "truncated index: " + std::to_string(idx_.size()) + " bytes, header promises " + std::to_string(need));
  sizes_ = p + sizes_offset();
  pointers_ = p + pointers_offset();
  docs_ = p + docs_offset();
}

void IndexedData::check_documents() {
  const std::string& path = idx_.path();
  if (doc_index(0) != 0) fail(path, "corrupt document index: first entry is " + std::to_string(doc_index(0)) + ", not 0");
  if (doc_index(d_ - 1) != n_)
    fail(path, "corrupt document index: last entry is " + std::to_string(doc_index(d_ - 1)) + ", not the sequence count " +
                   std::to_string(n_));
  for (int64_t i = 1; i < d_; ++i)
    if (doc_index(i) < doc_index(i - 1)) fail(path, "corrupt document index: decreasing at entry " + std::to_string(i));
}

void IndexedData::check_sequences() {
  const std::string& bin_path = bin_.path();
  int64_t expected = n_ > 0 ? pointer(0) : 0;
  for (int64_t i = 0; i < n_; ++i) {
    int64_t len = size(i), ptr = pointer(i);
    if (len < 0) fail(idx_.path(), "negative length for sequence " + std::to_string(i));
    if (ptr < 0 || ptr % itemsize_ != 0)
      fail(idx_.path(), "bad byte offset " + std::to_string(ptr) + " for sequence " + std::to_string(i));
    if (ptr > bin_.size() || len * itemsize_ > bin_.size() - ptr)
      fail(bin_path, "truncated data: sequence " + std::to_string(i) + " ends at byte " + std::to_string(ptr + len * itemsize_) +
                         " past the end of the file (" + std::to_string(bin_.size()) + " bytes)");
    contiguous_ = contiguous_ && ptr == expected;
    expected = ptr + len * itemsize_;
    num_tokens_ += len;
  }
}

RawTokens::RawTokens(const std::string& path, int64_t itemsize) : file_(path), itemsize_(itemsize) {
  if (itemsize != 2 && itemsize != 4) fail(path, "headerless token files must be uint16 or uint32");
  if (file_.size() == 0) fail(path, "empty token file");
  if (file_.size() % itemsize != 0)
    fail(path, "truncated: " + std::to_string(file_.size()) + " bytes is not a whole number of " + std::to_string(itemsize) +
                   "-byte tokens");
}

}  // namespace dsel
