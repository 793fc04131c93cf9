// One tus-js-client Upload instance under Node, run as its own process by
// tests/interop/test_tus_js_client.py.
//
//   node tus_upload.mjs --endpoint URL --file PATH [--chunk-size N] [--upload-url URL]
//                       [--checksum sha256|sha1|none]      (the bearer token in INTEROP_TOKEN)
//
// With --upload-url, the Upload resumes that upload (HEAD, then PATCH from the server's
// offset) instead of creating one. No retries (retryDelays: null): a cut connection ends
// this instance, and the test starts a new one.
//
// tus-js-client does not implement the tus checksum extension, so --checksum adds
// `Upload-Checksum` itself in onBeforeRequest: the digest of the very bytes the PATCH carries
// (the file from the request's Upload-Offset, chunkSize long at most).
//
// Prints one JSON line: url, resumedAt (the offset of the first PATCH), offset (the last
// offset the server acknowledged), fileId and storageElementId (the final PATCH's
// Upload-File-Id and Upload-Storage-Element-Id), error (or null), and for bench/tus.py
// seconds: total (from the first request to the stored file) and finalPatch (the request
// carrying the last byte, from its start to its answer). Exit code 0 when the upload
// completed, 3 when it stopped on an error.
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { basename } from 'node:path'
import { parseArgs } from 'node:util'

import { Upload } from 'tus-js-client'

const INTERRUPTED = 3
const { values: args } = parseArgs({
  options: {
    endpoint: { type: 'string' },
    file: { type: 'string' },
    'chunk-size': { type: 'string', default: String(256 * 1024) },
    'upload-url': { type: 'string' },
    checksum: { type: 'string', default: 'sha256' },
  },
})
const token = process.env.INTEROP_TOKEN
if (!args.endpoint || !args.file || !token) {
  console.error('usage: INTEROP_TOKEN=... node tus_upload.mjs --endpoint URL --file PATH')
  process.exit(2)
}
const chunkSize = Number(args['chunk-size'])
const data = readFileSync(args.file)
const report = { url: null, resumedAt: null, offset: null, fileId: null, storageElementId: null, error: null, total: null, finalPatch: null }
const started = performance.now()
let lastPatchAt = null

const outcome = await new Promise((resolve) => {
  const upload = new Upload(data, {
    endpoint: args.endpoint,
    uploadUrl: args['upload-url'] ?? null,
    chunkSize,
    retryDelays: null,
    storeFingerprintForResuming: false,
    headers: { Authorization: `Bearer ${token}` },
    metadata: {
      filename: basename(args.file),
      filetype: 'application/octet-stream',
      retention_policy: 'temporary',
      compress: 'false',
      description: 'tus-js-client interop upload',
    },
    onBeforeRequest(req) {
      if (req.getMethod() !== 'PATCH') return
      const offset = Number(req.getHeader('Upload-Offset'))
      if (report.resumedAt === null) report.resumedAt = offset
      if (offset + chunkSize >= data.length) lastPatchAt = performance.now()
      if (args.checksum === 'none') return
      const chunk = data.subarray(offset, Math.min(offset + chunkSize, data.length))
      const digest = createHash(args.checksum).update(chunk).digest('base64')
      req.setHeader('Upload-Checksum', `${args.checksum} ${digest}`)
    },
    onChunkComplete(_chunkSize, bytesAccepted) {
      report.offset = bytesAccepted
    },
    onSuccess({ lastResponse }) {
      const now = performance.now()
      report.total = (now - started) / 1000
      if (lastPatchAt !== null) report.finalPatch = (now - lastPatchAt) / 1000
      report.fileId = lastResponse.getHeader('Upload-File-Id') ?? null
      report.storageElementId = lastResponse.getHeader('Upload-Storage-Element-Id') ?? null
      resolve(upload)
    },
    onError(error) {
      report.error = String(error)
      resolve(upload)
    },
  })
  upload.start()
})
report.url = outcome.url
console.log(JSON.stringify(report))
process.exit(report.error ? INTERRUPTED : 0)
